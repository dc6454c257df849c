// Building the page from data, safely, and formatting values for people.
//
// Every element is made with createElement and every piece of data becomes a
// text node or a property: there is no innerHTML anywhere in the console, so
// a worker name or a line of output can never become markup.

// h('a', {href: '#/x', class: 'link'}, 'text', child, [more children])
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  if (props) {
    for (const [key, value] of Object.entries(props)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === 'style' || key === 'innerHTML' || key === 'outerHTML') {
        // The CSP forbids style attributes; markup from strings is never built.
        throw new Error(`h(): ${key} is not allowed`);
      }
      if (key === 'class') el.className = value;
      else if (key === 'dataset') Object.assign(el.dataset, value);
      else if (key.startsWith('on') && typeof value === 'function') {
        el.addEventListener(key.slice(2), value);
      } else if (key in el && typeof el[key] !== 'object') el[key] = value;
      else el.setAttribute(key, value === true ? '' : String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else if (child instanceof Node) el.appendChild(child);
    else el.appendChild(document.createTextNode(String(child)));
  }
}

// Replaces an element's children (with a fragment or nothing).
export function fill(el, ...children) {
  const frag = document.createDocumentFragment();
  append(frag, children);
  el.replaceChildren(frag);
}

// The state of a worker or a job as a badge; the text is exactly the state.
export function badge(state, extra = '') {
  return h('span', { class: `badge s-${String(state).replace(/[^a-z_]/g, '')} ${extra}`.trim() }, state);
}

// Label and value pairs: [[term, value, id?], ...]; a null pair is skipped.
export function details(pairs) {
  return h(
    'dl',
    { class: 'details' },
    pairs.filter(Boolean).map(([term, value, id]) => h('div', null, h('dt', null, term), h('dd', id ? { id } : null, value)))
  );
}

// -- formatting ---------------------------------------------------------------

function pad(n, width = 2) {
  return String(n).padStart(width, '0');
}

// "2025-05-12 09:41:02" in the browser's local time.
export function localTime(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return (
    `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`
  );
}

// "4 s", "3 min 20 s", "2 h 5 min", "3 d 4 h"
export function duration(ms) {
  if (!Number.isFinite(ms)) return '';
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return ms < 1000 && ms > 0 ? `${Math.round(ms)} ms` : `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return s % 60 ? `${m} min ${s % 60} s` : `${m} min`;
  const hr = Math.floor(m / 60);
  if (hr < 48) return m % 60 ? `${hr} h ${m % 60} min` : `${hr} h`;
  const d = Math.floor(hr / 24);
  return hr % 24 ? `${d} d ${hr % 24} h` : `${d} d`;
}

// "just now", "12 s ago", "3 min ago"
export function ago(iso, now = Date.now()) {
  if (!iso) return 'never';
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return String(iso);
  const ms = now - t;
  if (ms < 2000) return 'just now';
  const s = Math.floor(ms / 1000);
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 172800) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

// A time element with the local time on hover and a relative text.
export function timeAgo(iso, now) {
  if (!iso) return h('span', { class: 'muted' }, 'never');
  return h('time', { dateTime: iso, title: `${localTime(iso)} (${iso})` }, ago(iso, now));
}

export function bytes(n) {
  if (!Number.isFinite(n)) return '';
  if (n < 1024) return `${n} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let i = -1;
  do {
    v /= 1024;
    i += 1;
  } while (v >= 1024 && i < units.length - 1);
  return `${v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}

export function count(n, one, many = `${one}s`) {
  return `${n.toLocaleString('en-US')} ${n === 1 ? one : many}`;
}

// The command line a job runs, for display: bash count.sh 3 0.2
export function commandLine(job) {
  const quote = (a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, "'\\''")}'`);
  return [job.command, job.path, ...(job.args || [])].filter((x) => x !== undefined && x !== null).map(quote).join(' ');
}
