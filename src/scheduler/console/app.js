// The console's shell: sign-in, the header, and the hash router that shows
// one view at a time.
//
// A view is a function (ctx) -> cleanup. ctx.signal is aborted when the view
// is left, which cancels its requests, timers and streams; ctx.ready() sets
// body[data-ready] once the view's first data is on the page.

import * as api from './api.js';
import { h, fill } from './dom.js';
import { workersView, workerView, groupView } from './views.js';
import { jobView } from './job.js';
import { startView, fanoutView } from './forms.js';

const $ = (id) => document.getElementById(id);

const app = {
  me: null, // {name, scope, via} from /v1/whoami
  controller: null, // aborts the current view
  cleanup: null,
  errorSource: null, // who put the message in #error
};

// -- routes -------------------------------------------------------------------

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, '');
  const q = raw.indexOf('?');
  const path = q === -1 ? raw : raw.slice(0, q);
  const query = new URLSearchParams(q === -1 ? '' : raw.slice(q + 1));
  const parts = path
    .split('/')
    .filter((p) => p !== '')
    .map((p) => {
      try {
        return decodeURIComponent(p);
      } catch {
        return p;
      }
    });
  return { parts, query };
}

function route({ parts }) {
  const [a, b, c, d, ...more] = parts;
  if (more.length === 0) {
    if (a === 'workers' && b === undefined) return { name: 'workers', view: workersView, params: {} };
    if (a === 'workers' && c === undefined) return { name: 'worker', view: workerView, params: { worker: b } };
    if (a === 'workers' && c === 'jobs' && d !== undefined) {
      return { name: 'job', view: jobView, params: { worker: b, job: d } };
    }
    if (a === 'start' && b === undefined) return { name: 'start', view: startView, params: {} };
    if (a === 'fanout' && b === undefined) return { name: 'fanout', view: fanoutView, params: {} };
    if (a === 'groups' && b !== undefined && c === undefined) {
      return { name: 'group', view: groupView, params: { group: b } };
    }
  }
  return { name: 'notfound', view: notFoundView, params: {} };
}

function notFoundView(ctx) {
  fill(ctx.root, h('h1', null, 'Not found'), h('p', null, 'There is no such page. ', h('a', { href: '#/workers' }, 'Go to the workers.')));
  ctx.ready();
}

// -- errors -------------------------------------------------------------------

// Shows an error in #error: the API's title and description, as text.
function showError(err, source = 'view') {
  const box = $('error');
  app.errorSource = source;
  if (err instanceof api.ApiError) {
    fill(box, h('strong', null, err.title), err.description ? `: ${err.description}` : '');
  } else {
    fill(box, h('strong', null, 'Error'), ` ${err && err.message ? err.message : String(err)}`);
  }
  box.classList.add('shown');
}

// Clears #error if `source` (or anyone, without one) put its message there.
function clearError(source) {
  if (source && app.errorSource !== source) return;
  const box = $('error');
  box.replaceChildren();
  box.classList.remove('shown');
  app.errorSource = null;
}

// -- views --------------------------------------------------------------------

function leaveView() {
  if (app.controller) app.controller.abort();
  if (app.cleanup) {
    try {
      app.cleanup();
    } catch (err) {
      console.error(err);
    }
  }
  app.controller = null;
  app.cleanup = null;
}

function setView(name) {
  document.body.dataset.view = name;
  delete document.body.dataset.ready;
  clearError();
  for (const link of document.querySelectorAll('#nav a')) {
    if (link.dataset.nav === name || (name === 'worker' && link.dataset.nav === 'workers')) {
      link.setAttribute('aria-current', 'page');
    } else link.removeAttribute('aria-current');
  }
}

function render() {
  leaveView();
  if (!app.me) {
    signinView();
    return;
  }
  const where = parseHash();
  if (where.parts.length === 0) {
    location.replace('#/workers'); // hashchange renders it
    return;
  }
  const { name, view, params } = route(where);
  setView(name);
  const controller = new AbortController();
  app.controller = controller;
  const root = $('view');
  root.replaceChildren();
  const ctx = {
    root,
    params,
    query: where.query,
    me: app.me,
    canRun: app.me.scope === 'run',
    signal: controller.signal,
    ready() {
      if (!controller.signal.aborted) document.body.dataset.ready = '1';
    },
    showError(err, source) {
      if (controller.signal.aborted || (err && err.name === 'AbortError')) return;
      showError(err, source);
    },
    clearError(source) {
      if (!controller.signal.aborted) clearError(source);
    },
    setTitle(text) {
      document.title = text ? `${text} · jobgate` : 'jobgate console';
    },
  };
  ctx.setTitle('');
  try {
    app.cleanup = view(ctx) || null;
  } catch (err) {
    console.error(err);
    showError(err);
    ctx.ready();
  }
}

// -- sign-in ------------------------------------------------------------------

function showHeader() {
  const signedIn = Boolean(app.me);
  $('nav').hidden = !signedIn;
  $('account').hidden = !signedIn;
  if (signedIn) {
    fill($('whoami'), h('span', { class: 'who-name' }, app.me.name), ' ', h('span', { class: `scope scope-${app.me.scope}` }, app.me.scope));
    $('whoami').title = `signed in as ${app.me.name} with a ${app.me.scope} ${app.me.via === 'certificate' ? 'certificate' : 'token'}`;
    for (const link of document.querySelectorAll('#nav [data-needs="run"]')) {
      link.hidden = app.me.scope !== 'run';
    }
  } else {
    $('whoami').replaceChildren();
  }
}

function signinView(message = '') {
  setView('signin');
  document.title = 'Sign in · jobgate';
  const token = h('input', {
    id: 'token',
    type: 'password',
    // Not a password to remember: the token lives in this tab's session only.
    autocomplete: 'one-time-code',
    spellcheck: false,
    required: true,
    placeholder: 'API token',
  });
  const submit = h('button', { id: 'signin-submit', type: 'submit', class: 'button primary' }, 'Sign in');
  const error = h('p', { id: 'signin-error', class: 'form-error', role: 'alert' }, message);
  const form = h(
    'form',
    { id: 'signin', class: 'card signin', novalidate: true },
    h('h1', null, 'Sign in'),
    h('p', { class: 'muted' }, 'Use a jobgate API token. It is kept in this tab only and forgotten when the tab closes.'),
    h('label', { htmlFor: 'token' }, 'API token'),
    token,
    error,
    h('div', { class: 'actions' }, submit)
  );
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const value = token.value.trim();
    if (!value) {
      error.textContent = 'Enter a token.';
      token.focus();
      return;
    }
    submit.disabled = true;
    error.textContent = '';
    try {
      const me = await api.whoami({ token: value });
      api.setToken(value);
      signedIn(me);
    } catch (err) {
      if (err.status === 401) {
        error.textContent = `That token was not accepted: ${err.description || err.title}. Check it and try again.`;
      } else {
        error.textContent = err.message || String(err);
      }
      submit.disabled = false;
      token.select();
    }
  });
  fill($('view'), form);
  token.focus();
  document.body.dataset.ready = '1';
}

function signedIn(me) {
  app.me = me;
  showHeader();
  const where = parseHash();
  if (where.parts.length === 0 || route(where).name === 'notfound') {
    // Set the hash without waiting for hashchange, then show the view.
    history.replaceState(null, '', '#/workers');
  }
  render();
}

function signOut(message = '') {
  leaveView();
  api.clearToken();
  app.me = null;
  showHeader();
  signinView(message);
}

// A 401 on any call: the token was revoked or is wrong.
api.onUnauthorized((err) => {
  if (!app.me) return;
  signOut(`Your token is no longer accepted (${err.description || err.title}). Sign in again.`);
});

$('signout').addEventListener('click', () => signOut());

window.addEventListener('hashchange', () => {
  if (app.me) render();
});

async function start() {
  if (!api.getToken()) {
    signinView();
    return;
  }
  try {
    signedIn(await api.whoami());
  } catch (err) {
    // A 401 has cleared the token already; anything else keeps it.
    if (err.status === 401) api.clearToken();
    const message =
      err.status === 401
        ? `Your token is no longer accepted (${err.description || err.title}). Sign in again.`
        : `Could not check the token: ${err.message}`;
    signinView(message);
  }
}

start();
