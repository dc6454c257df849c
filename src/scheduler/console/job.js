// The job page: its status, a stop button, and its output followed live.

import * as api from './api.js';
import { h, fill, localTime, duration, bytes, commandLine, details } from './dom.js';
import { followEvents } from './sse.js';
import { OutputTail, OutputPre } from './output.js';
import { workerHref } from './views.js';

const OUTPUT_FLUSH_MS = 250; // at most four DOM updates of the output a second
const FIREHOSE_FLUSH_MS = 1000; // ... and one while it comes faster than it is kept

const isAbort = (err) => err && err.name === 'AbortError';

// A bad event must not break the stream (a throw would reconnect forever).
function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

export function jobView(ctx) {
  const { worker: w, job: j } = ctx.params;
  ctx.setTitle(`Job ${j.slice(0, 8)}`);
  let status = null;

  const stateEl = h('span', { id: 'job-state', class: 'badge' });
  const exitReason = h('span', { id: 'job-exit-reason' });
  const exitBox = h('span', { class: 'exit muted', hidden: true }, 'exit reason: ', exitReason);
  const actions = h('div', { class: 'job-actions' });
  const info = h('div', { class: 'job-info' });
  const pre = h('pre', { id: 'job-output', class: 'output', tabIndex: 0, 'aria-label': 'Job output' });
  const notice = h('p', { id: 'output-notice', class: 'notice', 'aria-live': 'polite' });
  const follow = h('span', { id: 'output-status', class: 'muted' });
  const download = h('a', { id: 'job-download', class: 'button', href: location.hash, title: 'The whole output as a text file' }, 'Download output');

  fill(
    ctx.root,
    h(
      'nav',
      { class: 'crumbs', 'aria-label': 'Breadcrumb' },
      h('a', { href: '#/workers' }, 'Workers'),
      ' / ',
      h('a', { href: workerHref(w) }, w),
      ' / '
    ),
    h(
      'div',
      { class: 'view-head' },
      h('h1', null, 'Job ', h('span', { class: 'mono job-id' }, j)),
      actions
    ),
    h('div', { class: 'job-status' }, stateEl, exitBox),
    info,
    h('div', { class: 'output-head' }, h('h2', null, 'Output'), follow, download),
    notice,
    pre
  );

  // -- status

  let stopButton = null;
  let tick = null;

  function drawStatus(s) {
    status = s;
    stateEl.textContent = s.state;
    stateEl.className = `badge s-${s.state}`;
    exitReason.textContent = s.exit_reason || '';
    exitBox.hidden = !s.exit_reason;
    const started = Date.parse(s.started_at);
    const ended = s.ended_at ? Date.parse(s.ended_at) : NaN;
    const took = Number.isFinite(started)
      ? Number.isFinite(ended)
        ? duration(ended - started)
        : s.state === 'running'
          ? `${duration(Date.now() - started)} so far`
          : ''
      : '';
    const limits = Object.entries(s.limits || {})
      .map(([k, v]) => `${k}=${v}`)
      .join(', ');
    fill(
      info,
      details([
        ['Command', h('code', null, commandLine(s)), 'job-command'],
        s.reason ? ['Reason', s.reason, 'job-reason'] : null,
        ['Started', localTime(s.started_at), 'job-started'],
        ['Ended', s.ended_at ? localTime(s.ended_at) : s.state === 'running' ? 'still running' : '', 'job-ended'],
        ['Duration', took, 'job-duration'],
        s.stopped_by ? ['Stopped by', `${s.stopped_by}${s.stopped_at ? ` at ${localTime(s.stopped_at)}` : ''}`, 'job-stopped-by'] : null,
        s.exit_code !== null && s.exit_code !== undefined ? ['Exit code', String(s.exit_code)] : null,
        s.signal ? ['Signal', String(s.signal)] : null,
        ['Output', bytes(s.output_bytes || 0)],
        s.output_dropped_bytes ? ['Dropped by the output cap', bytes(s.output_dropped_bytes)] : null,
        ['Timeout', s.timeout_s ? `${s.timeout_s} s` : 'none'],
        ['Limits', limits || 'worker defaults'],
        s.idempotency_key ? ['Idempotency key', h('code', null, s.idempotency_key)] : null,
        ['Process id', s.pid ? String(s.pid) : ''],
      ])
    );
    // The stop button exists only for run tokens, only while the job runs.
    const canStop = ctx.canRun && s.state === 'running';
    if (canStop && !stopButton) {
      stopButton = h('button', { id: 'job-stop', type: 'button', class: 'button danger' }, 'Stop');
      stopButton.addEventListener('click', stop);
      actions.appendChild(stopButton);
    } else if (!canStop && stopButton) {
      stopButton.remove();
      stopButton = null;
    }
    // Keep "so far" moving while it runs.
    if (s.state === 'running' && !tick) {
      tick = setInterval(() => status && drawStatusTime(), 1000);
    } else if (s.state !== 'running' && tick) {
      clearInterval(tick);
      tick = null;
    }
  }

  function drawStatusTime() {
    const el = document.getElementById('job-duration');
    const started = Date.parse(status.started_at);
    if (el && status.state === 'running' && Number.isFinite(started)) el.textContent = `${duration(Date.now() - started)} so far`;
  }

  // While the output cannot be read, the job may still end: its status can
  // come from the scheduler's record even when its worker is away.
  async function refreshStatus() {
    if (!status || status.state !== 'running') return;
    try {
      drawStatus(await api.getJob(w, j, { signal: ctx.signal }));
    } catch {
      // the output follower says what is wrong
    }
  }

  async function stop() {
    if (!stopButton) return;
    // A stop cannot be taken back: ask once.
    if (!window.confirm(`Stop job ${j} on ${w}? It gets SIGTERM, and SIGKILL if it has not ended after the worker's grace period.`)) return;
    if (!stopButton) return; // it ended meanwhile
    stopButton.disabled = true;
    stopButton.textContent = 'Stopping…';
    try {
      drawStatus(await api.stopJob(w, j, { signal: ctx.signal }));
      ctx.clearError('stop');
    } catch (err) {
      if (isAbort(err)) return;
      ctx.showError(err, 'stop');
      if (stopButton) {
        stopButton.disabled = false;
        stopButton.textContent = 'Stop';
      }
    }
  }

  // -- output

  const tail = new OutputTail();
  const writer = new OutputPre(pre);
  let flushTimer = null;
  let flushDelay = OUTPUT_FLUSH_MS;

  // The output keeps its end in view until the reader scrolls up, and again
  // once they scroll back down to the end. Only scrolls that follow the
  // reader's own wheel, touch, key or pointer count: the page's own, and
  // blocks of text getting their real height, do not.
  let followEnd = true;
  let touched = 0;
  const touch = () => {
    touched = performance.now();
  };
  for (const type of ['wheel', 'touchmove', 'keydown', 'pointerdown']) pre.addEventListener(type, touch, { passive: true });
  pre.addEventListener('scroll', () => {
    if (performance.now() - touched < 1500) followEnd = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 48;
  });
  const toEnd = () => {
    if (followEnd) pre.scrollTop = pre.scrollHeight;
  };

  function flush() {
    flushTimer = null;
    const change = tail.flush();
    if (!change) return;
    const began = performance.now();
    if (change.replace !== undefined) writer.replace(change.replace);
    else writer.append(change.append);
    toEnd();
    // Once more after the new blocks were laid out and got their real size.
    requestAnimationFrame(toEnd);
    notice.textContent = tail.notice();
    // While the output comes faster than the page keeps it (every update
    // replaces all the text), once a second is as much as anyone can read,
    // and it keeps the page from making and dropping megabytes of text four
    // times a second. Should showing the text take long, update less often
    // still: the page spends at most about a fifth of its time on it.
    const took = performance.now() - began;
    const every = change.replace !== undefined ? FIREHOSE_FLUSH_MS : OUTPUT_FLUSH_MS;
    flushDelay = Math.min(2000, Math.max(every, took * 4));
  }

  function scheduleFlush() {
    if (!flushTimer) flushTimer = setTimeout(flush, flushDelay);
  }

  function followOutput() {
    let url;
    try {
      url = api.outputUrl(w, j);
    } catch (err) {
      ctx.showError(err, 'output');
      return;
    }
    followEvents(url, {
      signal: ctx.signal,
      headers: () => api.authHeaders(),
      isEnd: (ev) => ev.event === 'end',
      onEvent(ev) {
        if (ev.event === 'output') {
          tail.add(ev.data);
          scheduleFlush();
        } else if (ev.event === 'gap') {
          const gap = parseJson(ev.data);
          if (gap && Number.isFinite(gap.skipped)) tail.gap(gap.skipped);
          scheduleFlush();
        } else if (ev.event === 'end') {
          clearTimeout(flushTimer);
          flush();
          pre.classList.add('ended');
          const final = parseJson(ev.data);
          if (final && final.state) drawStatus(final);
        }
      },
      // Output ids are byte offsets; after a gap the output goes on at its
      // offset, which is as good a place to resume from.
      resumeId(ev) {
        if (ev.event === 'output') return ev.id;
        if (ev.event === 'gap') {
          const gap = parseJson(ev.data);
          return gap && Number.isInteger(gap.offset) ? String(gap.offset) : null;
        }
        return null;
      },
      async onResponseError(res) {
        const err = await api.errorFrom(res);
        if (res.status === 401) {
          api.refused(err);
          return false;
        }
        // Busy or unreachable for now: say so and try again.
        if (res.status === 429 || res.status >= 500) {
          follow.textContent = `${err.title}: ${err.description} Retrying…`;
          refreshStatus();
          return true;
        }
        ctx.showError(err, 'output');
        follow.textContent = 'not following';
        return false;
      },
      onStatus(what) {
        const words = {
          connecting: 'connecting…',
          reconnecting: 'reconnecting…',
          following: 'following live',
          waiting: 'connection lost; retrying…',
          ended: 'complete',
        };
        if (what === 'waiting') refreshStatus();
        if (what === 'waiting' && follow.textContent.endsWith('Retrying…')) return;
        follow.textContent = words[what] || what;
      },
    }).catch((err) => {
      if (!isAbort(err)) ctx.showError(err, 'output');
    });
  }

  // -- download: the whole output as plain text, saved through a Blob URL

  let blobUrl = null;
  let saving = false; // the click that saves the fetched Blob goes through
  download.addEventListener('click', async (event) => {
    if (saving) return;
    event.preventDefault();
    if (download.getAttribute('aria-busy') === 'true') return;
    download.setAttribute('aria-busy', 'true');
    download.textContent = 'Preparing download…';
    try {
      const blob = await api.outputBlob(w, j, { signal: ctx.signal });
      if (blobUrl) URL.revokeObjectURL(blobUrl);
      blobUrl = URL.createObjectURL(blob);
      download.href = blobUrl;
      download.download = `job-${j}.txt`;
      saving = true;
      download.click();
      ctx.clearError('download');
    } catch (err) {
      ctx.showError(err, 'download');
    } finally {
      saving = false;
      download.removeAttribute('aria-busy');
      download.textContent = 'Download output';
    }
  });

  // -- start: the status first (the view is ready with it), then the output

  (async () => {
    try {
      drawStatus(await api.getJob(w, j, { signal: ctx.signal }));
    } catch (err) {
      if (isAbort(err)) return;
      ctx.showError(err, 'status');
      stateEl.textContent = '';
      if (err.status === 404 || err.status === 401 || err.status === 403) {
        ctx.ready();
        return;
      }
    }
    ctx.ready();
    followOutput();
  })();

  return () => {
    clearTimeout(flushTimer);
    clearInterval(tick);
    if (blobUrl) URL.revokeObjectURL(blobUrl);
  };
}
