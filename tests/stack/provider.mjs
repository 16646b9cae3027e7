// A small, real OpenID provider (npm `oidc-provider`) for the integration tests.
//
//   node tests/stack/provider.mjs [--port=0] [--access-ttl=600] [--rotate=1] ...
//
// Every option can also be given as an environment variable (OP_PORT, OP_ACCESS_TTL,
// ...); a command line option wins.  Binds 127.0.0.1 only.  With port 0 the system
// picks a free port; the issuer follows it.  When ready it prints one line on stdout:
//
//   oidc-provider ready issuer=http://127.0.0.1:PORT port=PORT
//
// Options (env name / flag, default):
//   OP_PORT / --port                    0     listening port (0: any free port)
//   OP_ACCESS_TTL / --access-ttl        600   access token lifetime, seconds
//   OP_ROTATE / --rotate                1     rotate refresh tokens on every use
//   OP_OMIT_UNROTATED / --omit-unrotated 1    without rotation, leave refresh_token out of
//                                             refresh answers (RFC 6749 section 6 allows it;
//                                             py-oidc-auth then answers refresh_token: null)
//   OP_DEVICE / --device                1     offer the device authorization grant
//   OP_DEVICE_INTERVAL / --device-interval -  add "interval" to device answers (oidc-provider
//                                             sends none; py-oidc-auth then announces 5 s)
//   OP_DEVICE_TTL / --device-ttl        600   device code lifetime, seconds
//   OP_SLOW_DOWN / --slow-down          0     answer slow_down to the first N polls of
//                                             every device code
//   OP_CLIENT_ID / --client-id          py-oidc-auth          confidential client
//   OP_CLIENT_SECRET / --client-secret  py-oidc-auth-secret
//   OP_PUBLIC_CLIENT_ID / --public-client-id py-oidc-auth-public  public client (no secret)
//   OP_NO_DEVICE_CLIENT_ID / --no-device-client-id py-oidc-auth-no-device  a public client
//                                             that gets device codes but, like some
//                                             providers, is refused at the token endpoint
//                                             once the user approved: 400 unauthorized_client
//
// Test-only routes (plain JSON, never part of a real provider):
//   GET    /__test/polls   device-code polls seen at the token endpoint:
//                          [{t: epoch seconds (float), device: short hash, answer: "..."}]
//   DELETE /__test/polls   forget them
//   GET    /__test/grants  every token endpoint request: [{t, grant: grant_type, client,
//                          code: short hash of the authorization code or ""}]
//   DELETE /__test/grants  forget them
//   GET    /__test/config  the options in effect

import * as crypto from 'node:crypto';
import * as http from 'node:http';
import * as querystring from 'node:querystring';

// oidc-provider 9 warns "Unsupported runtime" at import on any Node.js before 22 LTS.
// This stack runs and passes its tests on Node.js 20 LTS as well: drop that one warning
// there (only there), so that a supported setup starts quietly.
const Provider = await importProvider();

async function importProvider() {
  const warn = console.warn;
  if (process.versions.node.split('.')[0] === '20') {
    console.warn = (...args) => {
      if (!String(args[0]).includes('Unsupported runtime')) warn(...args);
    };
  }
  try {
    return (await import('oidc-provider')).default;
  } finally {
    console.warn = warn;
  }
}

const OPTIONS = {
  port: ['OP_PORT', '0'],
  'access-ttl': ['OP_ACCESS_TTL', '600'],
  rotate: ['OP_ROTATE', '1'],
  'omit-unrotated': ['OP_OMIT_UNROTATED', '1'],
  device: ['OP_DEVICE', '1'],
  'device-interval': ['OP_DEVICE_INTERVAL', ''],
  'device-ttl': ['OP_DEVICE_TTL', '600'],
  'slow-down': ['OP_SLOW_DOWN', '0'],
  'client-id': ['OP_CLIENT_ID', 'py-oidc-auth'],
  'client-secret': ['OP_CLIENT_SECRET', 'py-oidc-auth-secret'],
  'public-client-id': ['OP_PUBLIC_CLIENT_ID', 'py-oidc-auth-public'],
  'no-device-client-id': ['OP_NO_DEVICE_CLIENT_ID', 'py-oidc-auth-no-device'],
};

function readOptions(argv, env) {
  const out = {};
  for (const [flag, [envName, fallback]] of Object.entries(OPTIONS)) {
    out[flag] = env[envName] ?? fallback;
  }
  for (let i = 0; i < argv.length; i += 1) {
    const m = /^--([a-z-]+)(?:=(.*))?$/.exec(argv[i]);
    if (!m || !(m[1] in OPTIONS)) {
      console.error(`provider.mjs: unknown argument ${argv[i]}`);
      process.exit(2);
    }
    out[m[1]] = m[2] ?? argv[(i += 1)];
  }
  return out;
}

const opt = readOptions(process.argv.slice(2), process.env);
const flag = (name) => !['0', 'false', 'no', 'off', ''].includes(String(opt[name]).toLowerCase());
const int = (name) => Number.parseInt(opt[name], 10);

const ACCESS_TTL = int('access-ttl');
const SLOW_DOWN = int('slow-down');
const DEVICE_INTERVAL = opt['device-interval'] === '' ? undefined : int('device-interval');
// The one resource server: oidc-provider issues JWT access tokens only for a resource
// (RFC 8707), and py-oidc-auth checks access tokens as JWTs against the JWKS.
const RESOURCE = 'https://api.py-oidc-auth.test';
const SCOPES = ['openid', 'offline_access', 'profile', 'email'];
const LOOPBACK_REDIRECTS = [
  'http://localhost/callback',
  'http://127.0.0.1/callback',
  'http://[::1]/callback',
];

function grantTypes() {
  const types = ['authorization_code', 'refresh_token'];
  if (flag('device')) types.push('urn:ietf:params:oauth:grant-type:device_code');
  return types;
}

function signingKey() {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, kid: crypto.randomBytes(8).toString('hex'), alg: 'RS256', use: 'sig' };
}

function configuration() {
  return {
    clients: [
      {
        client_id: opt['client-id'],
        client_secret: opt['client-secret'],
        application_type: 'native',
        grant_types: grantTypes(),
        response_types: ['code'],
        redirect_uris: LOOPBACK_REDIRECTS,
        token_endpoint_auth_method: 'client_secret_basic',
      },
      {
        client_id: opt['public-client-id'],
        application_type: 'native',
        grant_types: grantTypes(),
        response_types: ['code'],
        redirect_uris: LOOPBACK_REDIRECTS,
        token_endpoint_auth_method: 'none',
      },
      {
        client_id: opt['no-device-client-id'],
        application_type: 'native',
        grant_types: grantTypes(),
        response_types: ['code'],
        redirect_uris: LOOPBACK_REDIRECTS,
        token_endpoint_auth_method: 'none',
      },
    ],
    jwks: { keys: [signingKey()] },
    cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
    scopes: SCOPES,
    claims: {
      openid: ['sub'],
      profile: ['name', 'preferred_username'],
      email: ['email', 'email_verified'],
    },
    // Dev accounts: any login name is an account.
    async findAccount(ctx, sub) {
      return {
        accountId: sub,
        async claims() {
          return {
            sub, name: sub, preferred_username: sub, email: `${sub}@example.test`, email_verified: true,
          };
        },
      };
    },
    features: {
      devInteractions: { enabled: true },
      deviceFlow: { enabled: flag('device') },
      revocation: { enabled: true },
      introspection: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: async (ctx, client, oneOf) => oneOf ?? RESOURCE,
        useGrantedResource: async () => true,
        getResourceServerInfo: async () => ({
          scope: SCOPES.join(' '),
          audience: RESOURCE,
          accessTokenTTL: ACCESS_TTL,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        }),
      },
    },
    extraTokenClaims: async (ctx, token) => (
      token.kind === 'AccessToken' ? { preferred_username: token.accountId } : undefined
    ),
    pkce: { required: () => true },
    // Refresh tokens for every grant that may have one, offline_access consented or not.
    issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
    expiresWithSession: async () => false,
    rotateRefreshToken: () => flag('rotate'),
    ttl: {
      AccessToken: ACCESS_TTL,
      DeviceCode: int('device-ttl'),
      RefreshToken: 24 * 3600,
      Grant: 24 * 3600,
      Session: 24 * 3600,
      Interaction: 3600,
      IdToken: 3600,
      AuthorizationCode: 60,
    },
    clientBasedCORS: () => false,
  };
}

// -- Test-only middleware --------------------------------------------------

const polls = [];
const grants = [];
const pollCounts = new Map();
const shortHash = (value) => crypto.createHash('sha256').update(String(value)).digest('hex').slice(0, 12);

async function readRawBody(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 64 * 1024) throw new Error('request body too large');
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

function sendJson(ctx, status, body) {
  ctx.status = status;
  ctx.type = 'application/json';
  ctx.set('Cache-Control', 'no-store');
  ctx.body = JSON.stringify(body);
}

async function testRoutes(ctx, next) {
  if (ctx.path === '/__test/polls') {
    if (ctx.method === 'DELETE') polls.length = 0;
    return sendJson(ctx, 200, polls);
  }
  if (ctx.path === '/__test/grants') {
    if (ctx.method === 'DELETE') grants.length = 0;
    return sendJson(ctx, 200, grants);
  }
  if (ctx.path === '/__test/config') {
    return sendJson(ctx, 200, { ...opt, resource: RESOURCE });
  }
  return next();
}

// oidc-provider never answers slow_down itself, and answers a refresh without rotation
// with the old refresh token; this middleware in front of the token endpoint adds both
// behaviours and records the device-code polls.
async function tokenEndpoint(ctx, next) {
  if (ctx.method !== 'POST' || ctx.path !== '/token' || !ctx.is('application/x-www-form-urlencoded')) {
    return next();
  }
  const raw = await readRawBody(ctx.req);
  // oidc-provider reads an already consumed body from req.body.
  ctx.req.body = raw;
  const form = querystring.parse(raw);
  const grantType = form.grant_type;
  const basic = /^Basic (.+)$/i.exec(ctx.get('authorization') || '');
  grants.push({
    t: Date.now() / 1000,
    grant: String(grantType ?? ''),
    client: String(form.client_id ?? (basic ? decodeURIComponent(
      Buffer.from(basic[1], 'base64').toString('utf8').split(':')[0],
    ) : '')),
    code: form.code ? shortHash(form.code) : '',
  });

  if (grantType === 'urn:ietf:params:oauth:grant-type:device_code') {
    const device = shortHash(form.device_code);
    const seen = (pollCounts.get(device) ?? 0) + 1;
    pollCounts.set(device, seen);
    const record = { t: Date.now() / 1000, device, n: seen, answer: '' };
    polls.push(record);
    if (seen <= SLOW_DOWN) {
      record.answer = 'slow_down';
      return sendJson(ctx, 400, {
        error: 'slow_down',
        error_description: 'polling too fast, add 5 seconds to the interval',
      });
    }
    await next();
    if (ctx.status === 200 && form.client_id === opt['no-device-client-id']) {
      // Approved, and only now refused: the device grant was never this client's.
      record.answer = 'unauthorized_client';
      return sendJson(ctx, 400, {
        error: 'unauthorized_client',
        error_description: 'the client is not allowed to use the device grant',
      });
    }
    record.answer = ctx.status === 200 ? 'token' : String(ctx.body?.error ?? ctx.status);
    return undefined;
  }

  await next();
  if (
    grantType === 'refresh_token' && !flag('rotate') && flag('omit-unrotated')
    && ctx.status === 200 && ctx.body && ctx.body.refresh_token === form.refresh_token
  ) {
    delete ctx.body.refresh_token;
  }
  return undefined;
}

async function deviceAuthorization(ctx, next) {
  await next();
  if (
    DEVICE_INTERVAL !== undefined && ctx.method === 'POST' && ctx.path === '/device/auth'
    && ctx.status === 200 && ctx.body && typeof ctx.body === 'object'
  ) {
    ctx.body.interval = DEVICE_INTERVAL;
  }
}

// -- Start -----------------------------------------------------------------

let handler = (req, res) => { res.statusCode = 503; res.end(); };
const server = http.createServer((req, res) => handler(req, res));

server.listen(int('port'), '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;
  const provider = new Provider(issuer, configuration());
  provider.use(testRoutes);
  provider.use(tokenEndpoint);
  provider.use(deviceAuthorization);
  handler = provider.callback();
  process.stdout.write(`oidc-provider ready issuer=${issuer} port=${port}\n`);
});

const stop = () => server.close(() => process.exit(0));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
