// The scheduler's HTTP API as the console uses it: the token, a fetch
// wrapper that sends it and turns error answers into ApiError, one function
// per route.

// The token lives in sessionStorage only: it goes when the tab closes, is
// never written to localStorage, a cookie or a URL.
const TOKEN_KEY = 'jobgate.token';

export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY) || '';
}

export function setToken(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
}

export function clearToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

// Called with the ApiError when the stored token is refused (401), so the
// app can go back to sign-in.
let unauthorized = () => {};
export function onUnauthorized(fn) {
  unauthorized = fn;
}

// For a 401 met outside send() (the output stream reads its own responses).
export function refused(err) {
  unauthorized(err);
}

export class ApiError extends Error {
  constructor(status, title, description) {
    super(description ? `${title}: ${description}` : title);
    this.status = status;
    this.title = title;
    this.description = description;
  }
}

export function authHeaders(token = getToken()) {
  return { Authorization: `Bearer ${token}` };
}

// The API answers every error with {"title", "description"}; anything else
// (a proxy's page, a cut connection) still becomes a readable ApiError.
export async function errorFrom(res) {
  let title = `HTTP ${res.status}`;
  let description = res.statusText || '';
  try {
    const body = await res.json();
    if (body && typeof body.title === 'string') title = body.title;
    if (body && typeof body.description === 'string') description = body.description;
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(res.status, title, description);
}

// Sends a request with the token and checks the answer. A 401 with the
// stored token signs out; `token` is given only to check a new one.
export async function send(method, path, { body, signal, token, accept } = {}) {
  const stored = token === undefined;
  const headers = authHeaders(stored ? getToken() : token);
  if (accept) headers.Accept = accept;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let res;
  try {
    res = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: 'no-store',
    });
  } catch (err) {
    if (err && err.name === 'AbortError') throw err;
    throw new ApiError(0, 'Network error', 'the scheduler could not be reached; check the connection and try again');
  }
  if (!res.ok) {
    const err = await errorFrom(res);
    if (res.status === 401 && stored) unauthorized(err);
    throw err;
  }
  return res;
}

async function json(method, path, opts = {}) {
  const res = await send(method, path, { ...opts, accept: 'application/json' });
  return res.json();
}

// A name or id as one segment of an API path. The browser would resolve "."
// and ".." as steps of the path (to another route), so they are refused.
function seg(value) {
  const text = String(value);
  if (text === '.' || text === '..') {
    throw new ApiError(400, 'Bad Request', `${JSON.stringify(text)} is not a name or an id`);
  }
  return encodeURIComponent(text);
}

export const whoami = (opts) => json('GET', '/v1/whoami', opts);
export const listWorkers = (opts) => json('GET', '/v1/workers', opts);
export const getWorker = async (w, opts) => json('GET', `/v1/workers/${seg(w)}`, opts);
export const listJobs = async (w, opts) => json('GET', `/v1/workers/${seg(w)}/jobs`, opts);
export const getJob = async (w, j, opts) => json('GET', `/v1/workers/${seg(w)}/jobs/${seg(j)}`, opts);
export const stopJob = async (w, j, opts) => json('POST', `/v1/workers/${seg(w)}/jobs/${seg(j)}/stop`, opts);
export const drainWorker = async (w, enable, opts) =>
  json('POST', `/v1/workers/${seg(w)}/drain`, { ...opts, body: { enable } });
export const startJob = async (w, body, opts) => json('POST', `/v1/workers/${seg(w)}/jobs`, { ...opts, body });
export const fanOut = (body, opts) => json('POST', '/v1/jobs', { ...opts, body });
export const getGroup = async (g, opts) => json('GET', `/v1/groups/${seg(g)}`, opts);
export const outputUrl = (w, j) => `/v1/workers/${seg(w)}/jobs/${seg(j)}/output`;

// The whole output as plain text (no event-stream Accept), as a Blob.
export async function outputBlob(w, j, opts = {}) {
  const res = await send('GET', outputUrl(w, j), opts);
  return res.blob();
}
