// Server-Sent Events over fetch().
//
// EventSource cannot send an Authorization header, so the console reads the
// event stream itself: createParser() is the pure core (bytes in, events out)
// and followEvents() is the resuming reader built on it.

// A parser for one event stream. push() takes the next chunk of bytes (a
// Uint8Array, split anywhere: mid-line, mid-UTF-8 sequence, between \r and
// \n) and returns the events that chunk completed; finish() flushes the end.
// Events are {event, data, id} where id is the id field of that event (or
// null when it had none); comments come out as {comment: "text"}.
export function createParser() {
  // stream: true keeps an unfinished UTF-8 sequence for the next chunk; the
  // decoder also drops a leading byte order mark, as the format asks.
  const decoder = new TextDecoder('utf-8');
  let rest = ''; // text after the last complete line
  let afterCR = false; // the last chunk ended in \r: a \n next is the same break
  let event = '';
  let data = [];
  let id = null;

  function line(text, out) {
    if (text === '') {
      // A blank line dispatches. An event with no data line is dropped.
      if (data.length > 0) {
        out.push({ event: event || 'message', data: data.join('\n'), id });
      }
      event = '';
      data = [];
      id = null;
      return;
    }
    const colon = text.indexOf(':');
    if (colon === 0) {
      out.push({ comment: text.slice(1).replace(/^ /, '') });
      return;
    }
    let field = text;
    let value = '';
    if (colon > 0) {
      field = text.slice(0, colon);
      value = text.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
    }
    if (field === 'event') event = value;
    else if (field === 'data') data.push(value);
    else if (field === 'id' && !value.includes('\0')) id = value;
    // "retry" and unknown fields: the follower keeps its own backoff.
  }

  function feed(text, out) {
    if (text === '') return; // e.g. a chunk that was half a UTF-8 character
    let start = 0;
    if (afterCR && text.startsWith('\n')) start = 1;
    afterCR = false;
    const buf = rest + text.slice(start);
    let pos = 0;
    // The next \n and \r at or after pos; each is searched for again only
    // once pos has passed it, so a chunk of many lines is scanned once.
    let n = -2;
    let r = -2;
    for (;;) {
      if (n !== -1 && n < pos) n = buf.indexOf('\n', pos);
      if (r !== -1 && r < pos) r = buf.indexOf('\r', pos);
      let end;
      if (n === -1 && r === -1) break;
      if (r === -1 || (n !== -1 && n < r)) end = n;
      else end = r;
      line(buf.slice(pos, end), out);
      if (buf[end] === '\r') {
        if (end + 1 === buf.length) {
          afterCR = true; // the \n may be the first byte of the next chunk
          pos = end + 1;
          break;
        }
        pos = buf[end + 1] === '\n' ? end + 2 : end + 1;
      } else {
        pos = end + 1;
      }
    }
    rest = buf.slice(pos);
  }

  return {
    push(bytes) {
      const out = [];
      feed(decoder.decode(bytes, { stream: true }), out);
      return out;
    },
    // At the end of the stream an event not closed by a blank line is
    // incomplete and is dropped, as the format says.
    finish() {
      const out = [];
      feed(decoder.decode(), out);
      rest = '';
      data = [];
      return out;
    },
  };
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
        const reader = res.body.getReader();
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
        for (;;) {
          const { value, done } = await reader.read();
          if (done) {
            handle(parser.finish());
            break;
          }
          gotData = true;
          handle(parser.push(value));
          if (ended) {
            reader.cancel().catch(() => {});
            break;
          }
          // A fast stream can have its chunks queued up; give the page a
          // turn now and then so it keeps painting and taking input.
          if (performance.now() - yieldedAt > 50) {
            await new Promise((r) => setTimeout(r, 0));
            yieldedAt = performance.now();
          }
        }
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
