// The forms that start jobs: on one worker, and on many (fan-out).

import * as api from './api.js';
import { h, fill } from './dom.js';
import { jobHref } from './views.js';

class FormError extends Error {}

function field(label, input, hint) {
  return h('div', { class: 'field' }, h('label', { htmlFor: input.id }, label), input, hint ? h('p', { class: 'hint' }, hint) : null);
}

function numberInput(id, placeholder) {
  return h('input', { id, type: 'number', min: '0', step: '1', inputMode: 'numeric', placeholder, autocomplete: 'off' });
}

// '' -> undefined; a whole number -> the number; else a FormError naming it.
function wholeNumber(input, what) {
  if (input.validity && input.validity.badInput) throw new FormError(`${what}: enter a whole number.`);
  const text = input.value.trim();
  if (text === '') return undefined;
  if (!/^\d+$/.test(text)) throw new FormError(`${what}: enter a whole number.`);
  return Number(text);
}

// The fields every start has (command, path, args, timeout, key, limits),
// with ids `${prefix}-command` and so on, and the body they make.
function jobFields(prefix) {
  const command = h('input', { id: `${prefix}-command`, type: 'text', value: 'bash', autocomplete: 'off', spellcheck: false });
  const path = h('input', { id: `${prefix}-path`, type: 'text', placeholder: 'count.sh', autocomplete: 'off', spellcheck: false });
  const args = h('textarea', { id: `${prefix}-args`, rows: 3, spellcheck: false, placeholder: 'one argument per line' });
  const timeout = numberInput(`${prefix}-timeout`, 'the worker’s default');
  const key = h('input', { id: `${prefix}-key`, type: 'text', autocomplete: 'off', spellcheck: false, maxLength: 256, placeholder: 'optional' });
  const memory = numberInput(`${prefix}-memory`, 'default');
  const cpu = numberInput(`${prefix}-cpu`, 'default');
  const tasks = numberInput(`${prefix}-tasks`, 'default');

  const elements = [
    h(
      'div',
      { class: 'grid two' },
      field('Interpreter', command, 'As named in the worker’s [jobs].interpreters.'),
      field('Script', path, 'Relative to the worker’s scripts directory.')
    ),
    field('Arguments', args, 'One argument per line, passed as they are (no shell).'),
    h(
      'div',
      { class: 'grid two' },
      field('Timeout (seconds)', timeout, 'Empty or 0: the worker’s default.'),
      field('Idempotency key', key, 'Sending the same key again returns the same job.')
    ),
    h(
      'fieldset',
      { class: 'limits' },
      h('legend', null, 'Limits (empty: the worker’s default)'),
      h('div', { class: 'grid three' }, field('Memory (MB)', memory), field('CPU (%)', cpu), field('Tasks', tasks))
    ),
  ];

  function body() {
    const out = {};
    out.command = command.value.trim();
    if (!out.command) throw new FormError('Interpreter: required (bash or sh, usually).');
    out.path = path.value.trim();
    if (!out.path) throw new FormError('Script: required, a path relative to the scripts directory.');
    // One argument per line; blank lines at the end are not arguments.
    const lines = args.value.replace(/\r\n?/g, '\n').split('\n');
    while (lines.length && lines[lines.length - 1] === '') lines.pop();
    out.args = lines;
    const t = wholeNumber(timeout, 'Timeout');
    if (t !== undefined) out.timeout_s = t;
    if (key.value !== '') out.idempotency_key = key.value;
    const limits = {};
    const m = wholeNumber(memory, 'Memory');
    const c = wholeNumber(cpu, 'CPU');
    const n = wholeNumber(tasks, 'Tasks');
    if (m !== undefined) limits.memory_mb = m;
    if (c !== undefined) limits.cpu_percent = c;
    if (n !== undefined) limits.tasks = n;
    if (Object.keys(limits).length) out.limits = limits;
    return out;
  }

  return { elements, body, focus: () => path.focus() };
}

function needsRun(ctx, what) {
  fill(
    ctx.root,
    h('h1', null, what),
    h('p', { class: 'notice' }, `This needs a token with the run scope; yours (${ctx.me.name}) has the ${ctx.me.scope} scope.`)
  );
  ctx.ready();
}

// Shows an error in the form's own error element, as text.
function formError(el, err) {
  if (err instanceof api.ApiError) fill(el, h('strong', null, err.title), err.description ? `: ${err.description}` : '');
  else el.textContent = err.message || String(err);
}

// Wires submit: preventDefault, disable while sending, errors to errorEl.
function onSubmit(ctx, form, button, errorEl, send) {
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    if (button.disabled) return;
    errorEl.replaceChildren();
    button.disabled = true;
    try {
      await send();
    } catch (err) {
      if (err && err.name === 'AbortError') return;
      formError(errorEl, err);
    } finally {
      button.disabled = false;
    }
  });
}

// -- start on one worker ------------------------------------------------------

export function startView(ctx) {
  ctx.setTitle('Start a job');
  if (!ctx.canRun) return needsRun(ctx, 'Start a job');
  const preset = ctx.query.get('worker') || '';
  const worker = h('select', { id: 'start-worker', name: 'worker' });
  if (preset) worker.appendChild(h('option', { value: preset }, preset));
  const fields = jobFields('start');
  const error = h('div', { id: 'start-error', class: 'form-error', role: 'alert' });
  const submit = h('button', { id: 'start-submit', type: 'submit', class: 'button primary' }, 'Start');
  const form = h(
    'form',
    { id: 'start-form', class: 'card form', novalidate: true },
    field('Worker', worker),
    fields.elements,
    error,
    h('div', { class: 'actions' }, submit)
  );
  fill(ctx.root, h('h1', null, 'Start a job'), form);

  onSubmit(ctx, form, submit, error, async () => {
    const name = worker.value;
    if (!name) throw new FormError('Worker: choose one.');
    const body = fields.body();
    const job = await api.startJob(name, body, { signal: ctx.signal });
    location.hash = jobHref(name, job.job_id);
  });

  // Fill the worker list; online workers are the ones that can take a job.
  api
    .listWorkers({ signal: ctx.signal })
    .then((answer) => {
      const frag = document.createDocumentFragment();
      let found = false;
      for (const w of answer.workers || []) {
        if (w.name === preset || w.id === preset) found = true;
        const text = w.state === 'online' && !w.degraded ? w.name : `${w.name} (${w.degraded ? 'degraded' : w.state})`;
        frag.appendChild(h('option', { value: w.name }, text));
      }
      const keep = preset && !found ? worker.firstChild : null; // an unknown preset stays
      worker.replaceChildren(frag);
      if (keep) worker.prepend(keep);
      const byId = (answer.workers || []).find((w) => w.id === preset);
      if (preset) worker.value = byId ? byId.name : preset;
      else {
        const online = (answer.workers || []).find((w) => w.state === 'online' && !w.degraded);
        if (online) worker.value = online.name;
      }
      ctx.ready();
    })
    .catch((err) => {
      if (err && err.name === 'AbortError') return;
      ctx.showError(err);
      ctx.ready();
    });
  if (preset) fields.focus();
}

// -- fan-out ------------------------------------------------------------------

// "role=web, zone=a" -> {role: "web", zone: "a"}
function parseLabels(text) {
  const labels = {};
  for (const part of text.split(',')) {
    const item = part.trim();
    if (!item) continue;
    const eq = item.indexOf('=');
    if (eq <= 0) throw new FormError(`Labels: "${item}" is not key=value.`);
    labels[item.slice(0, eq).trim()] = item.slice(eq + 1).trim();
  }
  return labels;
}

export function fanoutView(ctx) {
  ctx.setTitle('Fan-out');
  if (!ctx.canRun) return needsRun(ctx, 'Fan-out');
  const workers = h('input', { id: 'fanout-workers', type: 'text', placeholder: 'worker-1, worker-2', autocomplete: 'off', spellcheck: false });
  const labels = h('input', { id: 'fanout-labels', type: 'text', placeholder: 'role=web, zone=a', autocomplete: 'off', spellcheck: false });
  const all = h('input', { id: 'fanout-all', type: 'checkbox' });
  const fields = jobFields('fanout');
  const error = h('div', { id: 'fanout-error', class: 'form-error', role: 'alert' });
  const submit = h('button', { id: 'fanout-submit', type: 'submit', class: 'button primary' }, 'Start on all of them');
  const form = h(
    'form',
    { id: 'fanout-form', class: 'card form', novalidate: true },
    h(
      'fieldset',
      { class: 'selector' },
      h('legend', null, 'Where: exactly one of these'),
      field('Worker names', workers, 'Comma-separated names or ids.'),
      field('Labels', labels, 'Comma-separated key=value; a worker must have every one. Offline workers are left out.'),
      h('div', { class: 'field check' }, all, h('label', { htmlFor: 'fanout-all' }, 'All workers (not offline ones)'))
    ),
    fields.elements,
    error,
    h('div', { class: 'actions' }, submit)
  );
  fill(ctx.root, h('h1', null, 'Start a job on many workers'), form);

  onSubmit(ctx, form, submit, error, async () => {
    const names = workers.value
      .split(',')
      .map((s) => s.trim())
      .filter(Boolean);
    const wanted = parseLabels(labels.value);
    const chosen = [names.length > 0, Object.keys(wanted).length > 0, all.checked].filter(Boolean).length;
    if (chosen !== 1) {
      throw new FormError('Choose exactly one of: worker names, labels, or all workers.');
    }
    const body = fields.body();
    if (names.length) body.workers = names;
    else if (all.checked) body.all = true;
    else body.labels = wanted;
    const group = await api.fanOut(body, { signal: ctx.signal });
    location.hash = `#/groups/${encodeURIComponent(group.group_id)}`;
  });
  ctx.ready();
}
