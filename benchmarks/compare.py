"""Measure this client side by side with the reference package, in one run.

    python benchmarks/compare.py [--runs 30] [--calls 2000]

Makes (or reuses) two virtual environments under .venvs/ from the same base
interpreter: ``bench-ours`` with this project installed, ``reference`` with
``py-oidc-auth-client`` from PyPI.  Then it measures both on this machine:

- whole-process times, alternated A/B over many runs (median, min, max):
  bare ``python -c pass``, ``import py_oidc_auth_client`` with its bytecode
  cache (as after ``pip install``) and without it (a vendored copy in a
  read-only folder: the source is compiled at every start), and the CLI's
  ``--list`` on a small store;
- peak RSS of that CLI call (``ru_maxrss`` of the child, via ``os.wait4``);
- in-process per-call times: ``authenticate()`` returning a cached token,
  ``TokenStore.get`` and ``TokenStore.put`` on a store of 1000 hosts.

It prints one table with ratios against the reference and against bare
python.  Nothing here is a pass/fail test: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import venv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = "py-oidc-auth-client==2603.0.1"
HOST = "https://bench.example.org"

# Every child runs with its HOME as working directory: never this checkout, whose
# py_oidc_auth_client.py would shadow the installed one.
# Run inside each environment; prints a JSON object of per-call seconds.
IN_PROCESS = r"""
import json, os, sys, time
import py_oidc_auth_client as m

def token(access, lifetime):
    now = int(time.time())
    return {"access_token": access, "token_type": "Bearer", "expires": now + lifetime,
            "refresh_token": "r", "refresh_expires": now + 86400, "scope": "openid",
            "headers": {"Authorization": "Bearer " + access}}

def per_call(fn, calls):
    for _ in range(min(calls, 50)):
        fn()
    best = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best.append((time.perf_counter() - start) / calls)
    best.sort()
    return best[len(best) // 2]

calls, host, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
out = {}
m.TokenStore().put(host, token("eyJ.cached." + "x" * 800, 3600))
out["authenticate"] = per_call(lambda: m.authenticate(host), calls)

big = m.TokenStore(os.path.join(folder, "big.json"))
for i in range(1000):
    big.put(f"https://h{i}.example.org", token(f"eyJ.{i}." + "x" * 800, 3600))
out["get_1000"] = per_call(lambda: big.get("https://h500.example.org"), max(calls // 10, 20))
n = [0]
def put():
    n[0] += 1
    big.put("https://h500.example.org", token(f"eyJ.new{n[0]}." + "x" * 800, 3600))
out["put_1000"] = per_call(put, 20)
print(json.dumps(out))
"""


def _python(env: str) -> str:
    return os.path.join(env, "Scripts" if sys.platform == "win32" else "bin", "python")


def ensure_env(name: str, requirement: str) -> str:
    env = os.path.join(ROOT, ".venvs", name)
    python = _python(env)
    if not os.path.exists(python):
        print(f"creating {env} ...", file=sys.stderr)
        venv.create(env, with_pip=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        requirement], check=True)
    elif name == "bench-ours":  # keep it at the working tree's version
        subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "--force-reinstall", "--no-deps", requirement], check=True)
    # Compile once, so that no run pays for writing bytecode.
    subprocess.run([python, "-c", "import py_oidc_auth_client"], check=True,
                   env=_env(tempfile.gettempdir()), cwd=tempfile.gettempdir(),
                   capture_output=True)
    return python


def source_copy(python: str, into: str) -> str:
    """Copy the installed package (or module) into `into`, without bytecode; return `into`."""
    import shutil

    tmp = tempfile.gettempdir()
    where = subprocess.run([python, "-c", "import py_oidc_auth_client as m; print(m.__file__)"],
                           check=True, capture_output=True, text=True, env=_env(tmp), cwd=tmp
                           ).stdout.strip()
    os.makedirs(into)
    if os.path.basename(where) == "__init__.py":
        package = os.path.dirname(where)
        shutil.copytree(package, os.path.join(into, os.path.basename(package)),
                        ignore=shutil.ignore_patterns("__pycache__"))
    else:
        shutil.copy(where, into)
    return into


def _env(home: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "OIDC_", "SLURM_")) and k != "BROWSER"}
    env.update(HOME=home, XDG_CACHE_HOME=os.path.join(home, ".cache"))
    return env


def run_once(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall time and peak RSS (KiB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=env["HOME"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed with exit code {proc.returncode}")
    rss = usage.ru_maxrss if sys.platform != "darwin" else usage.ru_maxrss // 1024
    return elapsed, rss


def alternate(cases: dict[str, tuple[list[str], dict[str, str]]], runs: int
              ) -> dict[str, tuple[list[float], list[int]]]:
    results: dict[str, tuple[list[float], list[int]]] = {k: ([], []) for k in cases}
    for _ in range(runs):
        for name, (argv, env) in cases.items():  # A/B/... in turn, so drift hits all alike
            elapsed, rss = run_once(argv, env)
            results[name][0].append(elapsed)
            results[name][1].append(rss)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="whole-process runs per case")
    parser.add_argument("--calls", type=int, default=2000, help="in-process calls per batch")
    args = parser.parse_args()

    ours = ensure_env("bench-ours", ROOT)
    ref = ensure_env("reference", REFERENCE)
    with tempfile.TemporaryDirectory() as tmp:
        homes = {}
        for name, python in (("ours", ours), ("ref", ref)):
            home = os.path.join(tmp, name)
            os.makedirs(home)
            homes[name] = home
            # A small store for the --list runs, written by each implementation itself.
            seed = ("import time, py_oidc_auth_client as m; now = int(time.time())\n"
                    "for i in range(5):\n"
                    "    m.TokenStore().put(f'https://h{i}.example.org', {'access_token': 'a',"
                    " 'token_type': 'Bearer', 'expires': now + 3600, 'refresh_token': 'r',"
                    " 'refresh_expires': now + 86400, 'scope': 'openid',"
                    " 'headers': {'Authorization': 'Bearer a'}})")
            subprocess.run([python, "-c", seed], env=_env(home), cwd=home, check=True)

        # The same import from a copy of the source with no bytecode cache beside it.
        cold = {}
        for name, python in (("ours", ours), ("ref", ref)):
            cold[name] = dict(_env(homes[name]), PYTHONDONTWRITEBYTECODE="1",
                              PYTHONPATH=source_copy(python, os.path.join(tmp, name + "-src")))
        cases = {
            "bare": ([ours, "-c", "pass"], _env(homes["ours"])),
            "import ours": ([ours, "-c", "import py_oidc_auth_client"], _env(homes["ours"])),
            "import ref": ([ref, "-c", "import py_oidc_auth_client"], _env(homes["ref"])),
            "cold ours": ([ours, "-c", "import py_oidc_auth_client"], cold["ours"]),
            "cold ref": ([ref, "-c", "import py_oidc_auth_client"], cold["ref"]),
            "--list ours": ([ours, "-m", "py_oidc_auth_client", "--list"], _env(homes["ours"])),
            "--list ref": ([ref, "-m", "py_oidc_auth_client", "--list"], _env(homes["ref"])),
        }
        print(f"measuring {args.runs} alternated runs of {len(cases)} cases ...", file=sys.stderr)
        whole = alternate(cases, args.runs)

        calls = {}
        for name, python in (("ours", ours), ("ref", ref)):
            work = os.path.join(tmp, name + "-calls")
            os.makedirs(work)
            out = subprocess.run([python, "-c", IN_PROCESS, str(args.calls), HOST, work],
                                 env=_env(work), cwd=work, check=True, capture_output=True,
                                 text=True)
            calls[name] = json.loads(out.stdout)

    med = {k: statistics.median(v[0]) for k, v in whole.items()}
    bare = med["bare"]
    print(f"\npy_oidc_auth_client vs {REFERENCE}: Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} cores, {args.runs} runs each\n")
    print(f"{'figure':<42}{'ours':>12}{'reference':>12}{'ours/ref':>10}{'ours/bare':>10}"
          f"{'ref/bare':>10}")

    def row(label: str, a: float, b: float, unit: str, scale: float, vs_bare: bool) -> None:
        extra = (f"{a / bare:>9.2f}x{b / bare:>9.2f}x" if vs_bare else f"{'':>10}{'':>10}")
        print(f"{label:<42}{a * scale:>9.2f} {unit:<2}{b * scale:>9.2f} {unit:<2}"
              f"{a / b:>9.2f}x{extra}")

    print(f"{'python -c pass (median)':<42}{bare * 1e3:>9.2f} ms")
    row("import, bytecode cached (median)", med["import ours"], med["import ref"], "ms", 1e3,
        True)
    row("import, no bytecode (median)", med["cold ours"], med["cold ref"], "ms", 1e3, True)
    row("CLI --list (median)", med["--list ours"], med["--list ref"], "ms", 1e3, True)
    for key in ("import ours", "import ref", "cold ours", "cold ref", "--list ours", "--list ref"):
        times = whole[key][0]
        print(f"  {key:<40}min {min(times) * 1e3:.2f} ms, max {max(times) * 1e3:.2f} ms")
    rss_ours = statistics.median(whole["--list ours"][1]) / 1024
    rss_ref = statistics.median(whole["--list ref"][1]) / 1024
    print(f"{'CLI --list peak RSS':<42}{rss_ours:>9.1f} MiB{rss_ref:>8.1f} MiB"
          f"{rss_ours / rss_ref:>9.2f}x")
    row("authenticate(), cached token, per call", calls["ours"]["authenticate"],
        calls["ref"]["authenticate"], "us", 1e6, False)
    row("TokenStore.get, 1000 hosts", calls["ours"]["get_1000"], calls["ref"]["get_1000"],
        "us", 1e6, False)
    row("TokenStore.put, 1000 hosts", calls["ours"]["put_1000"], calls["ref"]["put_1000"],
        "ms", 1e3, False)
    print("\nours: lock file + fsync + atomic replace on every put; reference: no fsync")
    return 0


if __name__ == "__main__":
    sys.exit(main())
