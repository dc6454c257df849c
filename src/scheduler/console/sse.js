// Server-Sent Events over fetch().
//
// EventSource cannot send an Authorization header, so the console reads the
// event stream itself: createParser() is the pure core (bytes in, events out)
// and followEvents() is the resuming reader built on it.

// A parser for one event stream. push() takes the next chunk of bytes (a
// Uint8Array, split anywhere: mid-line, mid-UTF-8 sequence, between \r and
// \n) and returns the events that chunk completed; finish() ends the stream.
// Events are {event, data, id} where id is the id field of that event (or
// null when it had none); comments come out as {comment: "text"}.
//
// It works on the bytes: a job's output comes as events of many "data:"
// lines, and making a string of each line would leave the page hundreds of
// megabytes of short-lived strings to collect while a job writes gigabytes.
// Instead each data line's value is moved, in the buffer, next to the ones
// before it, and an event's data is decoded once, when its blank line comes.
// (A line break byte never occurs inside a UTF-8 character, so lines can be
// found in the bytes; the stream's UTF-8 is decoded one event at a time.)
export function createParser() {
  // ignoreBOM: a U+FEFF at the start of an event's data is the job's own;
  // the stream's byte order mark is dropped below.
  const decoder = new TextDecoder('utf-8', { ignoreBOM: true });
  let buf = new Uint8Array(64 * 1024);
  // buf[0, w): the data of the event being read, each value ending in \n;
  // buf[pos, len): bytes not read yet (w <= pos <= len).
  let w = 0;
  let pos = 0;
  let len = 0;
  let dataLines = 0;
  let type = '';
  let id = null;
  let afterCR = false; // the last chunk ended in \r: a \n first is the same break
  let atStart = true; // a byte order mark may come first

  const text = (from, to) => decoder.decode(buf.subarray(from, to));

  function append(bytes) {
    // Keep the event's data and the unread bytes, and make room.
    if (pos > w) {
      buf.copyWithin(w, pos, len);
      len -= pos - w;
      pos = w;
    }
    if (len + bytes.length > buf.length) {
      const bigger = new Uint8Array(Math.max(buf.length * 2, len + bytes.length));
      bigger.set(buf.subarray(0, len));
      buf = bigger;
    }
    if (bytes.indexOf(13) === -1) {
      const skip = afterCR && bytes[0] === 10 ? 1 : 0;
      buf.set(skip ? bytes.subarray(1) : bytes, len);
      len += bytes.length - skip;
      afterCR = false;
      return;
    }
    // \r\n and a lone \r become \n.
    for (let i = 0; i < bytes.length; i++) {
      const b = bytes[i];
      if (b === 13) buf[len++] = 10;
      else if (!(b === 10 && afterCR)) buf[len++] = b;
      afterCR = b === 13;
    }
  }

  function read(out) {
    if (atStart) {
      const bom = [0xef, 0xbb, 0xbf];
      const have = Math.min(3, len - pos);
      for (let i = 0; i < have; i++) if (buf[pos + i] !== bom[i]) atStart = false;
      if (atStart && have < 3) return; // too few bytes to tell yet
      if (atStart) pos += 3;
      atStart = false;
    }
    const view = buf.subarray(0, len); // (indexOf on buf would look past len)
    for (;;) {
      const nl = view.indexOf(10, pos);
      if (nl === -1) return;
      if (nl === pos) {
        // A blank line: the event is complete. One with no data is not sent.
        if (dataLines > 0) out.push({ event: type || 'message', data: text(0, w - 1), id });
        w = 0;
        dataLines = 0;
        type = '';
        id = null;
      } else if (buf[pos] === 58) {
        out.push({ comment: text(buf[pos + 1] === 32 ? pos + 2 : pos + 1, nl) });
      } else if (buf[pos] === 100 && buf[pos + 1] === 97 && buf[pos + 2] === 116 && buf[pos + 3] === 97 && (nl === pos + 4 || buf[pos + 4] === 58)) {
        // "data" or "data:value": the value and its \n go after the others.
        let from = Math.min(pos + 5, nl);
        if (from < nl && buf[from] === 32) from += 1;
        buf.copyWithin(w, from, nl + 1);
        w += nl + 1 - from;
        dataLines += 1;
      } else {
        let colon = pos;
        while (colon < nl && buf[colon] !== 58) colon += 1;
        const field = text(pos, colon);
        let from = colon < nl ? colon + 1 : nl;
        if (from < nl && buf[from] === 32) from += 1;
        if (field === 'event') type = text(from, nl);
        else if (field === 'id') {
          const value = text(from, nl);
          if (!value.includes('\0')) id = value;
        }
        // "retry" and unknown fields: the follower keeps its own backoff.
      }
      pos = nl + 1;
    }
  }

  return {
    push(bytes) {
      const out = [];
      if (bytes.length === 0) return out;
      append(bytes);
      read(out);
      return out;
    },
    // At the end of the stream an event not closed by a blank line is
    // incomplete and is dropped, as the format says.
    finish() {
      w = pos = len = dataLines = 0;
      type = '';
      id = null;
      return [];
    },
  };
}

const READ_BYTES = 64 * 1024;

// The bytes of a response body, in pieces of at most READ_BYTES. Where the
// browser offers a BYOB ("bring your own buffer") reader, one buffer is
// filled over and over: a fast stream then allocates no new buffer per piece
// (the default reader hands over chunks of up to megabytes, new each time),
// which keeps the page's memory flat while a job writes gigabytes.
async function* bodyChunks(body) {
  let reader;
  let buf = null;
  try {
    reader = body.getReader({ mode: 'byob' });
    buf = new Uint8Array(READ_BYTES);
  } catch {
    reader = body.getReader();
  }
  try {
    for (;;) {
      const { value, done } = buf ? await reader.read(buf) : await reader.read();
      if (done) return;
      if (buf) {
        yield value;
        buf = new Uint8Array(value.buffer); // the same memory, handed back
      } else {
        for (let at = 0; at < value.length; at += READ_BYTES) yield value.subarray(at, at + READ_BYTES);
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// Follows an event stream at url, reconnecting with Last-Event-ID.
//
// opts:
//   headers()            -> headers for each request (the Authorization one)
//   onEvent(ev)          -> called for every event; ev as from createParser
//   resumeId(ev)         -> the id to resume after once ev is handled, or
//                           null to keep the last one (default: ev.id)
//   isEnd(ev)            -> true for the event after which the stream is done
//   onResponseError(res) -> for a response that is not 200; returns true to
//                           retry after a backoff, false (or throws) to stop
//   onStatus(text)       -> what the follower is doing, for the page
//   signal               -> an AbortSignal that stops following
// Returns a promise that resolves when the end event came (true) or the
// follower was stopped (false).
export async function followEvents(url, opts) {
  const signal = opts.signal;
  const resumeId = opts.resumeId || ((ev) => ev.id);
  const status = opts.onStatus || (() => {});
  let lastId = null;
  let delay = 500;

  while (!signal || !signal.aborted) {
    const headers = { ...opts.headers(), Accept: 'text/event-stream' };
    if (lastId !== null) headers['Last-Event-ID'] = lastId;
    let ended = false;
    let gotData = false;
    try {
      status(lastId === null ? 'connecting' : 'reconnecting');
      const res = await fetch(url, { headers, signal, cache: 'no-store' });
      if (!res.ok) {
        const retry = await opts.onResponseError(res);
        if (!retry) return false;
        const after = Number(res.headers.get('Retry-After'));
        if (after > 0) delay = Math.max(delay, Math.min(after * 1000, 30000));
      } else {
        status('following');
        const parser = createParser();
        let yieldedAt = performance.now();
        const handle = (events) => {
          for (const ev of events) {
            if (ev.comment !== undefined) continue; // keep-alive
            opts.onEvent(ev);
            const id = resumeId(ev);
            if (id !== null && id !== undefined && id !== '') lastId = String(id);
            if (opts.isEnd(ev)) {
              ended = true;
              return;
            }
          }
        };
        for await (const value of bodyChunks(res.body)) {
          gotData = true;
          handle(parser.push(value));
          if (ended) break; // (ends the reader too)
          // A fast stream can keep this loop busy: give the page a turn now
          // and then, so it keeps painting and taking input.
          if (performance.now() - yieldedAt > 40) {
            await new Promise((r) => setTimeout(r, 0));
            yieldedAt = performance.now();
          }
        }
        if (!ended) handle(parser.finish());
        if (ended) {
          status('ended');
          return true;
        }
      }
    } catch (err) {
      if (signal && signal.aborted) return false;
      if (err && err.stopFollowing) throw err;
      // A network error: fall through to the backoff and resume.
    }
    if (gotData) delay = 500; // the connection was useful: start the backoff over
    status('waiting');
    await sleep(delay, signal);
    delay = Math.min(delay * 2, 10000);
  }
  return false;
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    if (signal) signal.addEventListener('abort', () => { clearTimeout(t); resolve(); }, { once: true });
  });
}
