// The views that show data: the workers, one worker and its jobs, one
// fan-out group. The job page is job.js.

import * as api from './api.js';
import { h, fill, badge, timeAgo, localTime, duration, count, commandLine, details } from './dom.js';

const PAGE_SIZE = 100;
const WORKERS_EVERY_MS = 5000;
const JOBS_EVERY_MS = 4000;
const GROUP_EVERY_MS = 2000;

const seg = encodeURIComponent;
export const workerHref = (w) => `#/workers/${seg(w)}`;
export const jobHref = (w, j) => `#/workers/${seg(w)}/jobs/${seg(j)}`;

// Runs fn now and again `ms` after each run ends, until the view is left.
// A hidden tab skips its turns: nobody is looking.
function poll(ctx, fn, ms) {
  let timer = null;
  const run = async () => {
    if (ctx.signal.aborted) return;
    let again = true;
    if (!document.hidden || !timer) again = (await fn()) !== false;
    if (again && !ctx.signal.aborted) timer = setTimeout(run, ms);
  };
  ctx.signal.addEventListener('abort', () => clearTimeout(timer));
  run();
}

const isAbort = (err) => err && err.name === 'AbortError';

// Previous / next buttons and "1–100 of 5,000".
function pager(id, onChange) {
  const prev = h('button', { id: `${id}-prev`, type: 'button', class: 'button quiet' }, '‹ Previous');
  const next = h('button', { id: `${id}-next`, type: 'button', class: 'button quiet' }, 'Next ›');
  const label = h('span', { id: `${id}-count`, class: 'pager-count' });
  const el = h('div', { class: 'pager' }, prev, label, next);
  const state = { page: 0 };
  prev.addEventListener('click', () => {
    state.page -= 1;
    onChange();
  });
  next.addEventListener('click', () => {
    state.page += 1;
    onChange();
  });
  return {
    el,
    // Clamps the page to the rows there are and returns the slice to show.
    slice(rows) {
      const pages = Math.max(1, Math.ceil(rows.length / PAGE_SIZE));
      state.page = Math.min(Math.max(0, state.page), pages - 1);
      const from = state.page * PAGE_SIZE;
      const shown = rows.slice(from, from + PAGE_SIZE);
      label.textContent =
        rows.length === 0 ? 'none' : `${from + 1}–${from + shown.length} of ${rows.length.toLocaleString('en-US')}`;
      prev.disabled = state.page === 0;
      next.disabled = state.page >= pages - 1;
      el.hidden = pages <= 1;
      return shown;
    },
    reset() {
      state.page = 0;
    },
  };
}

// Puts freshly built <tr>s into tbody, keyed by tr.dataset[key]. A row
// already there for the same key keeps its <tr> and <td> elements and only
// gets the cells that changed, so a refresh does not flicker, keeps a text
// selection, and leaves references to the page's elements valid.
function syncRows(tbody, rows, key, empty) {
  const old = new Map();
  for (const tr of Array.from(tbody.rows)) {
    const k = tr.dataset[key];
    if (k !== undefined && !old.has(k)) old.set(k, tr);
    else tr.remove();
  }
  if (old.size === 0) {
    const frag = document.createDocumentFragment();
    for (const tr of rows) frag.appendChild(tr);
    tbody.replaceChildren(frag);
  } else {
    rows.forEach((fresh, i) => {
      const k = fresh.dataset[key];
      let tr = old.get(k);
      if (tr) {
        old.delete(k);
        patchRow(tr, fresh);
      } else tr = fresh;
      const at = tbody.rows[i];
      if (at !== tr) tbody.insertBefore(tr, at || null);
    });
    for (const tr of old.values()) tr.remove();
  }
  if (rows.length === 0 && empty) tbody.appendChild(h('tr', { class: 'empty' }, h('td', { colSpan: 99 }, empty)));
}

function patchRow(tr, fresh) {
  tr.className = fresh.className;
  Object.assign(tr.dataset, fresh.dataset);
  if (tr.cells.length !== fresh.cells.length) {
    tr.replaceChildren(...fresh.childNodes);
    return;
  }
  for (let i = 0; i < fresh.cells.length; i++) {
    const cell = tr.cells[i];
    const next = fresh.cells[i];
    if (!cell.isEqualNode(next)) {
      cell.className = next.className;
      cell.replaceChildren(...next.childNodes);
    }
  }
}

function table(id, headings, tbody) {
  return h(
    'div',
    { class: 'table-wrap' },
    h('table', { id, class: 'data' }, h('thead', null, h('tr', null, headings.map((t) => h('th', { scope: 'col' }, t)))), tbody)
  );
}

function labelChips(labels) {
  const keys = Object.keys(labels || {}).sort();
  if (keys.length === 0) return h('span', { class: 'muted' }, '—');
  // Spaces between the chips keep the labels apart when copied.
  return keys.flatMap((k, i) => [i ? ' ' : null, h('span', { class: 'chip' }, `${k}=${labels[k]}`)]);
}

// -- workers ------------------------------------------------------------------

// The filter survives a visit to a worker and back.
let savedFilter = '';

// Terms separated by spaces or commas, all of which must match: key=value
// is a label, anything else a part of the name.
export function workerMatcher(text) {
  const terms = text
    .toLowerCase()
    .split(/[\s,]+/)
    .filter(Boolean);
  if (terms.length === 0) return () => true;
  return (w) =>
    terms.every((t) => {
      const eq = t.indexOf('=');
      if (eq > 0) {
        const key = t.slice(0, eq);
        const value = t.slice(eq + 1);
        return Object.entries(w.labels || {}).some(([k, v]) => k.toLowerCase() === key && String(v).toLowerCase() === value);
      }
      return w.name.toLowerCase().includes(t);
    });
}

export function workersView(ctx) {
  ctx.setTitle('Workers');
  const filter = h('input', {
    id: 'worker-filter',
    type: 'search',
    value: savedFilter,
    placeholder: 'Filter: name or label key=value',
    autocomplete: 'off',
    spellcheck: false,
    'aria-label': 'Filter workers by name or label',
  });
  const summary = h('p', { id: 'workers-summary', class: 'summary' }, 'Loading workers…');
  const tbody = h('tbody');
  const pages = pager('workers', draw);
  let workers = null;

  fill(
    ctx.root,
    h('div', { class: 'view-head' }, h('h1', null, 'Workers'), h('div', { class: 'toolbar' }, filter)),
    summary,
    table('workers', ['Name', 'State', 'Labels', 'Jobs', 'Last seen'], tbody),
    pages.el
  );

  let applied = filter.value;
  const onFilter = () => {
    if (filter.value === applied) return;
    applied = savedFilter = filter.value;
    pages.reset();
    draw();
  };
  for (const type of ['input', 'change', 'search']) filter.addEventListener(type, onFilter);

  function row(w, now) {
    return h(
      'tr',
      { class: 'worker', dataset: { name: w.name } },
      h(
        'td',
        { class: 'name' },
        h('a', { href: workerHref(w.name) }, w.name),
        w.degraded ? h('div', { class: 'degraded' }, `degraded: ${w.degraded}`) : null
      ),
      h('td', { class: 'state' }, badge(w.state, w.degraded ? 'is-degraded' : '')),
      h('td', { class: 'labels' }, labelChips(w.labels)),
      h('td', { class: 'jobs num' }, `${w.running_jobs} / ${w.capacity}`),
      h('td', { class: 'seen' }, timeAgo(w.last_seen_at, now))
    );
  }

  function draw() {
    if (!workers) return;
    const matching = workers.filter(workerMatcher(filter.value));
    const now = Date.now();
    const rows = pages.slice(matching).map((w) => row(w, now));
    syncRows(tbody, rows, 'name', workers.length ? 'No worker matches the filter.' : 'No workers have registered yet.');
    // "5,000 workers: 4,990 online, 10 unreachable"
    const states = {};
    for (const w of workers) states[w.state] = (states[w.state] || 0) + 1;
    const byState = Object.keys(states)
      .sort()
      .map((s) => `${states[s].toLocaleString('en-US')} ${s}`)
      .join(', ');
    const degraded = workers.filter((w) => w.degraded).length;
    let text = `${count(workers.length, 'worker')}${byState ? `: ${byState}` : ''}`;
    if (degraded) text += `; ${degraded.toLocaleString('en-US')} degraded`;
    if (matching.length !== workers.length) text += ` · ${matching.length.toLocaleString('en-US')} match the filter`;
    summary.textContent = text;
  }

  poll(
    ctx,
    async () => {
      try {
        const answer = await api.listWorkers({ signal: ctx.signal });
        workers = answer.workers || [];
        ctx.clearError('workers');
        draw();
      } catch (err) {
        if (isAbort(err)) return false;
        ctx.showError(err, 'workers');
        if (!workers) summary.textContent = 'The workers could not be loaded.';
      }
      ctx.ready();
      return true;
    },
    WORKERS_EVERY_MS
  );
}

// -- one worker ---------------------------------------------------------------

function jobRow(w, job, now) {
  const href = jobHref(w, job.job_id);
  const started = Date.parse(job.started_at);
  const ended = job.ended_at ? Date.parse(job.ended_at) : null;
  let took = '';
  if (Number.isFinite(started)) {
    took = ended ? duration(ended - started) : job.state === 'running' ? `${duration(now - started)} so far` : '';
  }
  return h(
    'tr',
    { class: 'job', dataset: { jobId: job.job_id, href } },
    h('td', { class: 'id mono' }, h('a', { href, title: job.job_id }, job.job_id.slice(0, 8))),
    h('td', { class: 'script mono' }, commandLine(job)),
    h('td', { class: 'state' }, badge(job.state)),
    h('td', { class: 'reason' }, job.reason || (job.state === 'running' ? '' : job.exit_reason || '')),
    h('td', { class: 'started' }, timeAgo(job.started_at, now)),
    h('td', { class: 'took num' }, took)
  );
}

export function workerView(ctx) {
  const w = ctx.params.worker;
  ctx.setTitle(w);
  const info = h('div', { class: 'worker-info' });
  const stale = h('p', { id: 'jobs-stale', class: 'notice', hidden: true });
  const tbody = h('tbody');
  const pages = pager('jobs', draw);
  const jobsCount = h('span', { class: 'muted', id: 'jobs-count' });
  // Drain (no new jobs; running ones go on) and undrain: run tokens only,
  // and only while the worker is online, since the worker itself keeps it.
  const drain = ctx.canRun
    ? h('button', { id: 'worker-drain', type: 'button', class: 'button', hidden: true })
    : null;
  let draining = false;
  let jobs = null;

  fill(
    ctx.root,
    h('nav', { class: 'crumbs', 'aria-label': 'Breadcrumb' }, h('a', { href: '#/workers' }, 'Workers'), ' / '),
    h(
      'div',
      { class: 'view-head' },
      h('h1', { id: 'worker-name' }, w),
      h(
        'div',
        { class: 'actions' },
        drain,
        ctx.canRun ? h('a', { id: 'start-here', class: 'button primary', href: `#/start?worker=${seg(w)}` }, 'Start a job here') : null
      )
    ),
    info,
    h('h2', null, 'Jobs ', jobsCount),
    stale,
    table('worker-jobs', ['Job', 'Script', 'State', 'Reason', 'Started', 'Duration'], tbody),
    pages.el
  );

  // A click anywhere on a job's row opens it, not only on its id.
  tbody.addEventListener('click', (event) => {
    if (event.target.closest('a') || String(window.getSelection())) return;
    const tr = event.target.closest('tr.job');
    if (tr) location.hash = tr.dataset.href;
  });

  if (drain) {
    drain.addEventListener('click', async () => {
      const enable = !draining;
      const question = enable
        ? `Drain ${w}? It starts no new jobs until it is undrained; jobs running there go on to their end.`
        : `Undrain ${w}? It takes new jobs again.`;
      if (!window.confirm(question)) return;
      drain.disabled = true;
      try {
        drawWorker(await api.drainWorker(w, enable, { signal: ctx.signal }));
        ctx.clearError('drain');
      } catch (err) {
        if (!(err && err.name === 'AbortError')) ctx.showError(err, 'drain');
      } finally {
        drain.disabled = false;
      }
    });
  }

  function drawWorker(worker) {
    const now = Date.now();
    draining = Boolean(worker.draining);
    if (drain) {
      drain.hidden = worker.state !== 'online';
      drain.textContent = draining ? 'Undrain' : 'Drain';
    }
    fill(
      info,
      details([
        ['State', [badge(worker.state, worker.degraded ? 'is-degraded' : ''), worker.degraded ? h('span', { class: 'degraded' }, ` degraded: ${worker.degraded}`) : null], 'worker-state'],
        ['Jobs', `${worker.running_jobs} running of ${worker.capacity}`],
        ['Labels', labelChips(worker.labels)],
        ['Last seen', timeAgo(worker.last_seen_at, now)],
        ['Registered', localTime(worker.registered_at)],
        ['Address', h('span', { class: 'mono' }, worker.address || '')],
        ['Version', worker.version || ''],
        ['Limits it enforces', (worker.enforceable_limits || []).join(', ') || 'none'],
        ['Id', h('span', { class: 'mono' }, worker.id)],
      ])
    );
  }

  function draw() {
    if (!jobs) return;
    const now = Date.now();
    syncRows(tbody, pages.slice(jobs).map((job) => jobRow(w, job, now)), 'jobId', 'No jobs on this worker.');
    const running = jobs.filter((j) => j.state === 'running').length;
    jobsCount.textContent = `${jobs.length.toLocaleString('en-US')} total, ${running} running`;
  }

  poll(
    ctx,
    async () => {
      const [worker, list] = await Promise.allSettled([
        api.getWorker(w, { signal: ctx.signal }),
        api.listJobs(w, { signal: ctx.signal }),
      ]);
      if (ctx.signal.aborted) return false;
      const failed = [worker, list].find((r) => r.status === 'rejected');
      if (failed) ctx.showError(failed.reason, 'worker');
      else ctx.clearError('worker');
      if (worker.status === 'fulfilled') drawWorker(worker.value);
      if (list.status === 'fulfilled') {
        jobs = list.value.jobs || [];
        stale.hidden = !list.value.stale;
        stale.textContent = list.value.stale
          ? 'The worker could not be asked: this list is the scheduler’s own record of the jobs it started there.'
          : '';
        draw();
      }
      ctx.ready();
      // An unknown worker stays unknown: stop asking.
      return !(failed && failed.reason.status === 404);
    },
    JOBS_EVERY_MS
  );
}

// -- a fan-out group ----------------------------------------------------------

export function groupView(ctx) {
  const g = ctx.params.group;
  ctx.setTitle(`Group ${g.slice(0, 8)}`);
  const summary = h('p', { id: 'group-summary', class: 'summary' }, 'Loading…');
  const about = h('div', { class: 'group-info' });
  const tbody = h('tbody');
  const errorsBody = h('tbody');
  const errorsBox = h('section', { class: 'group-errors', hidden: true }, h('h2', null, 'Workers that did not start it'), table('group-errors', ['Worker', 'Status', 'Error'], errorsBody));
  const names = new Map(); // worker id -> name, for the rows

  fill(
    ctx.root,
    h('div', { class: 'view-head' }, h('h1', null, 'Fan-out ', h('span', { class: 'mono job-id' }, g))),
    summary,
    about,
    table('group-jobs', ['Worker', 'Job', 'State', 'Reason', 'Started', 'Duration'], tbody),
    errorsBox
  );

  // Group entries name the worker by id; the worker list gives the names.
  const named = api
    .listWorkers({ signal: ctx.signal })
    .then((answer) => {
      for (const w of answer.workers || []) names.set(w.id, w.name);
    })
    .catch(() => {});

  function draw(group) {
    const s = group.summary || {};
    const states = Object.entries(s.states || {})
      .sort()
      .map(([k, v]) => `${v} ${k}`)
      .join(', ');
    summary.textContent =
      `${count(s.jobs || 0, 'job')}${states ? ` (${states})` : ''}, ${count(s.errors || 0, 'error')}` +
      `${s.stale ? `, ${s.stale} not answering` : ''} · ${s.done ? 'done' : 'running'}`;
    summary.dataset.done = s.done ? '1' : '0';
    const sel = group.selector || {};
    const selText = sel.all
      ? 'all workers'
      : sel.labels
        ? `workers labelled ${Object.entries(sel.labels).map(([k, v]) => `${k}=${v}`).join(', ')}`
        : `workers ${(sel.workers || []).join(', ')}`;
    fill(about, details([['Command', h('code', null, commandLine(group))], ['On', selText]]));

    const now = Date.now();
    const rows = (group.jobs || []).map((job) => {
      const wname = names.get(job.worker_id) || job.worker_name || job.worker_id;
      const href = jobHref(wname, job.job_id);
      const started = Date.parse(job.started_at);
      const ended = job.ended_at ? Date.parse(job.ended_at) : NaN;
      let took = '';
      if (Number.isFinite(started)) {
        if (Number.isFinite(ended)) took = duration(ended - started);
        else if (job.state === 'running') took = `${duration(now - started)} so far`;
      }
      return h(
        'tr',
        { class: 'group-job', dataset: { jobId: job.job_id } },
        h('td', { class: 'worker' }, h('a', { href: workerHref(wname) }, wname)),
        h('td', { class: 'id mono' }, h('a', { href, title: job.job_id }, job.job_id.slice(0, 8))),
        h('td', { class: 'state' }, badge(job.state)),
        h('td', { class: 'reason' }, job.reason || '', job.stale ? h('div', { class: 'stale' }, `last known state: ${job.stale_reason || 'the worker did not answer'}`) : null),
        h('td', { class: 'started' }, timeAgo(job.started_at, now)),
        h('td', { class: 'took num' }, took)
      );
    });
    syncRows(tbody, rows, 'jobId', 'No job was started.');

    const efrag = document.createDocumentFragment();
    for (const e of group.errors || []) {
      efrag.appendChild(
        h(
          'tr',
          { class: 'group-error' },
          h('td', null, e.worker_name || e.worker_id || ''),
          h('td', { class: 'num' }, String(e.status || '')),
          h('td', null, h('strong', null, e.title || ''), e.error ? `: ${e.error}` : '')
        )
      );
    }
    errorsBody.replaceChildren(efrag);
    errorsBox.hidden = !(group.errors || []).length;
  }

  poll(
    ctx,
    async () => {
      try {
        const group = await api.getGroup(g, { signal: ctx.signal });
        await named;
        if (ctx.signal.aborted) return false;
        draw(group);
        ctx.clearError('group');
        ctx.ready();
        return !(group.summary && group.summary.done);
      } catch (err) {
        if (isAbort(err)) return false;
        ctx.showError(err, 'group');
        ctx.ready();
        return err.status !== 404;
      }
    },
    GROUP_EVERY_MS
  );
}
