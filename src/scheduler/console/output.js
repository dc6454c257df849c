// The bounded tail of a job's output that the job page shows.
//
// A job may write gigabytes; the page keeps at most `limit` characters
// (1 MiB by default). Text comes in with add() as fast as the stream goes;
// the page takes it out with flush() a few times a second and either appends
// it to the <pre> or, once the limit is passed, replaces the <pre>'s text
// with a shorter tail. Trimming goes down to three quarters of the limit at
// once, so a fast job costs one large rebuild per quarter-limit of output
// rather than a small one per event. No DOM here: this is plain data.

export const DEFAULT_LIMIT = 1 << 20;

// How many bytes the UTF-8 form of s.slice(start, end) has. A lone surrogate
// counts as U+FFFD (3 bytes), as the encoder would write it.
export function utf8Length(s, start = 0, end = s.length) {
  let n = 0;
  for (let i = start; i < end; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x80) n += 1;
    else if (c < 0x800) n += 2;
    else if (c >= 0xd800 && c <= 0xdbff && i + 1 < end) {
      const d = s.charCodeAt(i + 1);
      if (d >= 0xdc00 && d <= 0xdfff) {
        n += 4;
        i += 1;
      } else n += 3;
    } else n += 3;
  }
  return n;
}

// The same, faster for the usual text that is all ASCII.
const NON_ASCII = /[^\x00-\x7f]/;
function byteLength(s) {
  return NON_ASCII.test(s) ? utf8Length(s) : s.length;
}

// Where to cut s to drop about `at` characters from its front: just after a
// line break when there is one close by, and never between the two halves
// of a surrogate pair.
function cutPoint(s, at) {
  if (at <= 0) return 0;
  if (at >= s.length) return s.length;
  const nl = s.indexOf('\n', at);
  if (nl !== -1 && nl - at < 4096) return nl + 1;
  const c = s.charCodeAt(at);
  return c >= 0xdc00 && c <= 0xdfff ? at + 1 : at;
}

function sizeWords(n) {
  return n >= 1 << 20 ? `${+(n / (1 << 20)).toFixed(1)} MiB` : `${Math.round(n / 1024)} KiB`;
}

export class OutputTail {
  constructor(limit = DEFAULT_LIMIT) {
    this.limit = limit;
    this.keep = Math.floor((limit * 3) / 4);
    this.shown = ''; // the text the page shows now
    this.pending = []; // text not yet handed to the page, from pending[head]
    this.head = 0;
    this.pendingChars = 0;
    this.replace = false; // the next flush replaces the shown text
    this.trimmedBytes = 0; // output bytes dropped from the front here
    this.capDroppedBytes = 0; // output bytes the worker's output cap dropped
  }

  add(text) {
    if (!text) return;
    this.pending.push(text);
    this.pendingChars += text.length;
    // Between two flushes a fast job can send far more than is ever shown:
    // once the newer pieces alone fill the page, the older ones go at once
    // (whole, without joining them: nothing big is built only to be dropped).
    let drop = this.head;
    while (drop < this.pending.length - 1 && this.pendingChars - this.pending[drop].length >= this.limit) {
      this.pendingChars -= this.pending[drop].length;
      this.trimmedBytes += byteLength(this.pending[drop]);
      drop += 1;
    }
    if (drop > this.head) {
      this.pending.fill(null, this.head, drop); // (let them be collected)
      this.head = drop;
      if (this.shown) {
        this.trimmedBytes += byteLength(this.shown);
        this.shown = '';
        this.replace = true;
      }
      if (this.head > 1024) {
        this.pending = this.pending.slice(this.head);
        this.head = 0;
      }
    }
  }

  // The worker's output cap dropped `skipped` bytes here; a line marks the
  // place, as the plain output does.
  gap(skipped) {
    this.capDroppedBytes += skipped;
    this.add(`\n[${skipped} bytes of output were dropped here by the worker's output cap]\n`);
  }

  get dirty() {
    return this.pendingChars > 0 || this.replace;
  }

  // What the page should do now: {append: text}, {replace: text} or null.
  flush() {
    if (!this.dirty) return null;
    const text = (this.head ? this.pending.slice(this.head) : this.pending).join('');
    this.pending = [];
    this.head = 0;
    this.pendingChars = 0;
    if (!this.replace && this.shown.length + text.length <= this.limit) {
      this.shown += text;
      return { append: text };
    }
    let all = this.shown + text;
    if (all.length > this.limit) {
      const cut = cutPoint(all, all.length - this.keep);
      this.trimmedBytes += utf8Length(all, 0, cut);
      all = all.slice(cut);
    }
    this.shown = all;
    this.replace = false;
    return { replace: all };
  }

  // The words for #output-notice: empty when everything is shown.
  notice() {
    const parts = [];
    if (this.trimmedBytes > 0) {
      parts.push(
        `${this.trimmedBytes} bytes of earlier output are not shown: the page keeps ` +
          `the last ${sizeWords(this.limit)}. ` +
          (this.capDroppedBytes > 0 ? 'The download has all the output the worker kept.' : 'The download has all of it.')
      );
    }
    if (this.capDroppedBytes > 0) {
      parts.push(`${this.capDroppedBytes} bytes were dropped by the worker's output cap and are not kept anywhere.`);
    }
    return parts.join(' ');
  }
}

// Writes the tail into the <pre> as blocks of whole lines (about 16 KiB
// each, the last one open for more). Each block is a <span class="chunk">
// whose layout the browser skips while it is off screen (content-visibility
// in style.css), so showing a new megabyte costs a few milliseconds instead
// of laying out all of it; textContent of the <pre> is still the text.
const CHUNK_CHARS = 16384;

export class OutputPre {
  constructor(pre) {
    this.pre = pre;
    this.open = null; // the last block, which more text goes into
    this.openChars = 0;
    this.openEndsLine = false;
  }

  // The end of the first line that ends at or after `at` (or the end of text).
  static lineEnd(text, at) {
    const nl = text.indexOf('\n', at);
    return nl === -1 ? text.length : nl + 1;
  }

  block(text) {
    const span = document.createElement('span');
    span.className = 'chunk';
    span.textContent = text;
    // A size to reserve while the block is not laid out: its line count
    // (the CSS line height is 1.45em); "auto" keeps the real one once known.
    let lines = 1;
    for (let i = text.indexOf('\n'); i !== -1 && i < text.length - 1; i = text.indexOf('\n', i + 1)) lines += 1;
    span.style.containIntrinsicSize = `auto ${(lines * 1.45).toFixed(2)}em`;
    return span;
  }

  blocks(text, from, frag) {
    let i = from;
    while (i < text.length) {
      const j = OutputPre.lineEnd(text, i + CHUNK_CHARS - 1);
      const piece = text.slice(i, j);
      this.open = this.block(piece);
      this.openChars = piece.length;
      this.openEndsLine = piece.endsWith('\n');
      frag.appendChild(this.open);
      i = j;
    }
  }

  replace(text) {
    const frag = document.createDocumentFragment();
    this.open = null;
    this.blocks(text, 0, frag);
    this.pre.replaceChildren(frag);
  }

  append(text) {
    let i = 0;
    if (this.open && this.open.isConnected) {
      // The open block takes text until it is full and its last line ended.
      if (this.openChars < CHUNK_CHARS || !this.openEndsLine) {
        i = OutputPre.lineEnd(text, Math.max(0, CHUNK_CHARS - this.openChars - 1));
        const piece = text.slice(0, i);
        this.open.appendChild(document.createTextNode(piece));
        this.openChars += piece.length;
        this.openEndsLine = piece.endsWith('\n');
      }
    }
    if (i < text.length) {
      const frag = document.createDocumentFragment();
      this.blocks(text, i, frag);
      this.pre.appendChild(frag);
    }
  }
}
