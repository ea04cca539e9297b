// Positions and resume (the contract's "Positions and resume" and
// `MEMBERSHIP_CHANGE`): every delivered entry names its stream (`inbox` or
// `channel:<id>`) and its position (`seq`, from 1, gap-free per session);
// membership changes are entries of the channel's stream and of the
// affected user's inbox; history items carry their positions; a client
// reconnecting with `resume` (to another gateway in the cluster runs)
// receives exactly what it missed, then `RESUMED`, then live events from
// the next position; a bad `resume` is refused with `invalid_resume`.
//
// Sessions here are opened by `open()`, which records every event from the
// socket's first packet on: a replay may arrive in the same read as the
// Socket.IO CONNECT, and socket.io-client emits such events before
// `connect`, so a listener attached after the connect would miss them.

import { describe, it, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { io } from 'socket.io-client';
import {
  startServer, users, uid, send, assertOkAck, assertTime, personalEvent, groupEvent,
  createChannel, closeSocket, closeAndSettle, metric, WAIT_MS, QUIET_MS, sleep,
} from './harness.mjs';

/** The events that are entries of a stream. */
const ENTRY_EVENTS = new Set(['MESSAGE_RECEIVE', 'GROUP_MESSAGE_RECEIVE', 'MEMBERSHIP_CHANGE']);
/** This file is about positions, not rate limits. */
const FAST = { FANOUT_LIMITS__MESSAGES_PER_SECOND: '10000', FANOUT_LIMITS__MESSAGE_BURST: '10000', FANOUT_LIMITS__SEND_QUEUE: '10000' };
/** Stands for a membership change's `createdAt` once checked (RFC 3339 UTC ms, near now). */
const TIME = '<createdAt: RFC 3339 UTC ms>';
const CHANGE_KEYS = ['byUserId', 'change', 'channelId', 'createdAt', 'seq', 'stream', 'userId'];

/** The exact MESSAGE_RECEIVE of a send, at position `seq` of the session user's inbox. */
const pm = (ack, from, to, content, seq, clientMsgId) => ({ ...personalEvent(ack, from, to, content, clientMsgId), stream: 'inbox', seq });
/** The exact GROUP_MESSAGE_RECEIVE of a send, at position `seq` of the channel's stream. */
const gm = (ack, ch, from, content, seq, clientMsgId) => ({ ...groupEvent(ack, ch, from, content, clientMsgId), stream: `channel:${ch}`, seq });
/** The exact MEMBERSHIP_CHANGE (createdAt checked apart) at `seq` of `stream` ("inbox" or "channel:<id>"). */
const mc = (stream, seq, channelId, userId, change, byUserId) => ({ stream, seq, channelId, userId, change, byUserId, createdAt: TIME });

/** A MEMBERSHIP_CHANGE payload with its field set and createdAt checked, createdAt replaced by TIME. */
function normChange(p) {
  assert.deepEqual(Object.keys(p ?? {}).sort(), CHANGE_KEYS,
    `the contract's MEMBERSHIP_CHANGE is { stream, seq, channelId, userId, change, byUserId, createdAt }; got ${JSON.stringify(p)}`);
  assertTime(p.createdAt, `MEMBERSHIP_CHANGE createdAt (${JSON.stringify(p)})`);
  return { ...p, createdAt: TIME };
}

const opened = new Set();
let roundRobin = 0;

/** A session with every server event recorded in arrival order. */
class Session {
  constructor(socket, user, gateway) {
    this.socket = socket;
    this.user = user;
    this.gateway = gateway;
    this.log = []; // { event, payload }
    this.waiters = new Set();
    socket.onAny((event, payload) => {
      this.log.push({ event, payload });
      for (const w of [...this.waiters]) w();
    });
  }

  /** Entry payloads (MEMBERSHIP_CHANGE normalized by normChange) of `log`, or of the whole log. */
  static entriesOf(log, stream) {
    return log
      .filter((x) => ENTRY_EVENTS.has(x.event) && x.payload?.stream === stream)
      .map((x) => (x.event === 'MEMBERSHIP_CHANGE' ? normChange(x.payload) : x.payload));
  }

  /** The entries of `stream` received, in order. */
  entries(stream) {
    return Session.entriesOf(this.log, stream);
  }

  /** Payloads of every `name` event received. */
  events(name) {
    return this.log.filter((x) => x.event === name).map((x) => x.payload);
  }

  /** Every entry event, whatever its stream. */
  allEntries() {
    return this.log.filter((x) => ENTRY_EVENTS.has(x.event));
  }

  /** The log before the first RESUMED, the RESUMED payloads, the log after the first. */
  split() {
    const i = this.log.findIndex((x) => x.event === 'RESUMED');
    if (i < 0) return { before: this.log, resumed: [], after: [] };
    return { before: this.log.slice(0, i), resumed: this.events('RESUMED'), after: this.log.slice(i + 1) };
  }

  /** The highest position received per stream: what a client passes back as `resume`. */
  positions() {
    const out = {};
    for (const { payload } of this.allEntries()) {
      if (typeof payload?.stream === 'string' && Number.isInteger(payload.seq)) {
        out[payload.stream] = Math.max(out[payload.stream] ?? 0, payload.seq);
      }
    }
    return out;
  }

  dump() {
    return JSON.stringify(this.log.map((x) => [x.event, x.payload])).slice(0, 4000);
  }

  /** Waits until `pred()` holds; the error says `what` the contract wanted and what arrived. */
  until(pred, what, timeout = WAIT_MS) {
    const holds = () => { try { return pred(); } catch { return false; } };
    if (holds()) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const check = () => { if (holds()) { done(); resolve(); } };
      const timer = setTimeout(() => {
        done();
        reject(new Error(`${this.user} (gateway ${this.gateway}): timed out after ${timeout} ms waiting for ${what}; received: ${this.dump()}`));
      }, timeout);
      const done = () => { clearTimeout(timer); this.waiters.delete(check); };
      this.waiters.add(check);
    });
  }

  /** Waits until position `seq` of `stream` arrived. */
  reach(stream, seq, timeout = WAIT_MS) {
    return this.until(
      () => this.allEntries().some((x) => x.payload?.stream === stream && x.payload.seq >= seq),
      `position ${seq} of stream "${stream}" (the contract: every MESSAGE_RECEIVE, GROUP_MESSAGE_RECEIVE and MEMBERSHIP_CHANGE carries "stream" and "seq", positions from 1 without gaps)`,
      timeout,
    );
  }

  /** Waits until the message with id `id` arrived (it is stored, then). */
  gotId(id, timeout = WAIT_MS) {
    return this.until(() => this.allEntries().some((x) => x.payload?.id === id), `message ${id}`, timeout);
  }

  /** Waits until one RESUMED arrived. */
  resumed(timeout = WAIT_MS) {
    return this.until(() => this.events('RESUMED').length > 0,
      'RESUMED (the contract: a connection with `resume` receives the missed entries, then one RESUMED { replayed, complete })', timeout);
  }

  close() {
    return closeSocket(this.socket);
  }
}

/**
 * Opens a session for `user` on `opts.gateway` (default: the next one,
 * round-robin) with its events recorded from the first packet. With
 * `opts.resume` (any value, passed as given) the auth is the function form
 * `(cb) => cb({ token, resume })`; without, `{ token }`. Rejects with the
 * connect_error.
 */
async function open(server, user, opts = {}) {
  const gateway = opts.gateway ?? roundRobin++;
  const url = server.urls[gateway % server.urls.length];
  const token = server.token(user);
  const auth = 'resume' in opts ? (cb) => cb({ token, resume: opts.resume }) : { token };
  const socket = io(url, {
    forceNew: true,
    reconnection: false,
    timeout: WAIT_MS,
    auth,
    ...(opts.transports ? { transports: opts.transports } : {}),
  });
  opened.add(socket);
  const session = new Session(socket, user, gateway % server.urls.length);
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => { cleanup(); socket.close(); reject(new Error('connect timed out')); }, WAIT_MS * 2);
    function cleanup() {
      clearTimeout(timer);
      socket.off('connect', onConnect);
      socket.off('connect_error', onError);
    }
    function onConnect() { cleanup(); resolve(); }
    function onError(err) { cleanup(); socket.close(); reject(err); }
    socket.on('connect', onConnect);
    socket.on('connect_error', onError);
  });
  return session;
}

/** Opens one session per user given, on consecutive gateways. */
async function openAll(server, ...userIds) {
  const out = [];
  for (const u of userIds) out.push(await open(server, u));
  return out;
}

/**
 * Every entry carries `stream` (a string) and `seq` (an integer from 1),
 * and within each stream the session received each next position exactly
 * once: n, then n + 1.
 */
function assertGapFree(s) {
  const last = new Map();
  for (const { event, payload } of s.allEntries()) {
    assert.equal(typeof payload?.stream, 'string',
      `${s.user}: the contract wants every ${event} to carry "stream" ("inbox" or "channel:<id>"); got ${JSON.stringify(payload)}`);
    assert.ok(Number.isInteger(payload.seq) && payload.seq >= 1,
      `${s.user}: the contract wants every ${event} to carry "seq", an integer from 1; got ${JSON.stringify(payload)}`);
    const prev = last.get(payload.stream);
    if (prev !== undefined) {
      assert.equal(payload.seq, prev + 1,
        `${s.user}: stream "${payload.stream}": after position ${prev} the contract wants ${prev + 1} (never a skip, never a repeat); got ${payload.seq}: ${s.dump()}`);
    }
    last.set(payload.stream, payload.seq);
  }
}

/** GET a history page with its items whole (harness.history takes their positions off). */
async function history(server, token, path, query = {}) {
  const qs = new URLSearchParams(query).toString();
  const r = await server.api('GET', qs ? `${path}?${qs}` : path, { token });
  assert.equal(r.status, 200, `GET ${path}?${qs}: ${r.status} ${JSON.stringify(r.body)}`);
  assert.deepEqual(Object.keys(r.body).sort(), ['messages', 'nextBefore'], `history body: ${JSON.stringify(r.body).slice(0, 500)}`);
  return r.body;
}

/** Asserts the connection is refused with connect_error "invalid_resume". */
async function assertInvalidResume(server, user, resume, what) {
  await assert.rejects(open(server, user, { resume }), (e) => {
    assert.equal(e.message, 'invalid_resume',
      `${what}: the contract wants the connection refused with connect_error "invalid_resume"; got "${e.message}"`);
    return true;
  }, `${what}: the contract wants the connection refused (connect_error "invalid_resume"), it connected`);
}

/**
 * The replay of a resumed session against what it missed (`missed`: stream
 * name to its exact entries after the given position, in order): before the
 * one RESUMED, the entries of each stream are exactly its missed entries
 * (for a stream named in `incomplete`: a run of consecutive ones among
 * them, at most `limit`), and `replayed` counts them; RESUMED is
 * `{ replayed, complete: true }` or with `incomplete`.
 */
function assertReplay(s, missed, { incomplete = [], limit = Infinity } = {}) {
  const { before, resumed } = s.split();
  assert.equal(resumed.length, 1, `${s.user}: the contract wants exactly one RESUMED after the replay; got ${resumed.length}: ${s.dump()}`);
  const replayedEntries = before.filter((x) => ENTRY_EVENTS.has(x.event));
  for (const x of replayedEntries) {
    assert.ok(x.payload?.stream in missed,
      `${s.user}: replayed an entry of a stream with nothing to replay (the contract: every entry after each given position, nothing else): ${JSON.stringify(x.payload)}`);
  }
  for (const [stream, entries] of Object.entries(missed)) {
    const got = Session.entriesOf(before, stream);
    if (incomplete.includes(stream)) {
      assert.ok(got.length <= limit, `${s.user}: "${stream}": replayed ${got.length} entries, the gateway replays at most ${limit}`);
      assert.ok(got.length < entries.length, `${s.user}: "${stream}" is reported incomplete but all ${entries.length} missed entries were replayed`);
      if (got.length > 0) {
        const start = entries.findIndex((e) => e.seq === got[0].seq);
        assert.ok(start >= 0, `${s.user}: "${stream}": the replay starts at ${got[0].seq}, not a missed position (${entries.map((e) => e.seq)})`);
        assert.deepEqual(got, entries.slice(start, start + got.length),
          `${s.user}: "${stream}": what an incomplete replay sends must be missed entries, in order, without gaps`);
      }
    } else {
      assert.deepEqual(got, entries,
        `${s.user}: "${stream}": the contract wants, before RESUMED, exactly every entry after the given position, in order`);
    }
  }
  const expected = { replayed: replayedEntries.length, complete: incomplete.length === 0 };
  if (incomplete.length) expected.incomplete = [...incomplete].sort();
  const got = { ...resumed[0] };
  if (Array.isArray(got.incomplete)) got.incomplete = [...got.incomplete].sort();
  assert.deepEqual(got, expected,
    `${s.user}: the contract wants RESUMED ${JSON.stringify(expected)} (replayed = the entries sent before it)`);
}

afterEach(() => {
  for (const s of opened) s.close();
  opened.clear();
});

describe('positions and resume', () => {
  let server;
  before(async () => { server = await startServer({ env: FAST }); });
  after(async () => {
    for (const s of opened) s.close();
    opened.clear();
    await server?.stop();
  });

  const addMember = (token, ch, userId) => server.api('POST', `/api/channels/${ch}/members`, { token, body: { userId } });
  const removeMember = (token, ch, userId) => server.api('DELETE', `/api/channels/${ch}/members/${userId}`, { token });

  it('every MESSAGE_RECEIVE / GROUP_MESSAGE_RECEIVE carries stream and seq: each side of a personal message in its own inbox, gap-free, the same in every tab', async () => {
    const [alice, bob, carol] = users('alice', 'bob', 'carol');
    // Created before anyone connects: alice's and bob's inboxes hold their
    // "added" at 1, the channel holds alice at 1 and bob at 2; none of it
    // is shown to the sessions opened afterwards without `resume`.
    const ch = await createChannel(server, server.token(alice), { id: uid('chan'), members: [bob] });
    const [a1, b1, a2, b2, c1] = await openAll(server, alice, bob, alice, bob, carol);
    const b3 = await open(server, bob, { transports: ['polling'] });

    // One conversation, sent one after another: alice's inbox 2..4, bob's 2..4.
    const acks = [];
    for (let i = 0; i < 3; i++) {
      const payload = i === 1 ? { to: bob, content: `m${i}`, clientMsgId: 'pos-1' } : { to: bob, content: `m${i}` };
      acks.push(assertOkAck(await send(a1.socket, payload)));
    }
    for (const s of [a1, a2, b1, b2, b3]) await s.reach('inbox', 4);
    const reply = assertOkAck(await send(b2.socket, { to: alice, content: 'reply' })); // 5 in both
    for (const s of [a1, a2, b1, b2, b3]) await s.reach('inbox', 5);
    const fromCarol = assertOkAck(await send(c1.socket, { to: bob, content: 'hi bob' })); // bob 6, carol 1
    for (const s of [b1, b2, b3, c1]) await s.gotId(fromCarol.id);
    const conv = acks.map((ack, i) => [ack, `m${i}`, i === 1 ? 'pos-1' : undefined]);
    const aliceInbox = [
      ...conv.map(([ack, content, cid], i) => pm(ack, alice, bob, content, 2 + i, cid)),
      pm(reply, bob, alice, 'reply', 5),
    ];
    const bobInbox = [
      ...conv.map(([ack, content, cid], i) => pm(ack, alice, bob, content, 2 + i, cid)),
      pm(reply, bob, alice, 'reply', 5),
      pm(fromCarol, carol, bob, 'hi bob', 6),
    ];

    // The channel: 3, 4 from alice, 5 from bob.
    const g = [];
    g.push(assertOkAck(await send(a2.socket, { channelId: ch, content: 'g0' })));
    g.push(assertOkAck(await send(a2.socket, { channelId: ch, content: 'g1', clientMsgId: 'gpos-1' })));
    for (const s of [b1, b2, b3]) await s.reach(`channel:${ch}`, 4);
    g.push(assertOkAck(await send(b1.socket, { channelId: ch, content: 'g2' })));
    for (const s of [a1, a2, b1, b2, b3]) await s.reach(`channel:${ch}`, 5);
    await sleep(QUIET_MS);
    const chan = [
      gm(g[0], ch, alice, 'g0', 3),
      gm(g[1], ch, alice, 'g1', 4, 'gpos-1'),
      gm(g[2], ch, bob, 'g2', 5),
    ];

    for (const s of [a1, a2, b1, b2, b3, c1]) {
      assertGapFree(s);
      for (const x of s.allEntries()) {
        assert.notEqual(x.event, 'MEMBERSHIP_CHANGE', `${s.user}: no membership changed while connected: ${JSON.stringify(x.payload)}`);
      }
      assert.deepEqual(s.events('RESUMED'), [], 'no RESUMED without resume');
    }
    for (const [i, s] of [a1, a2].entries()) {
      assert.deepEqual(s.entries('inbox'), aliceInbox, `alice tab ${i}: the sender's copies are positions of her own inbox ("stream": "inbox"), the same in every tab`);
      assert.deepEqual(s.entries(`channel:${ch}`), chan, `alice tab ${i}: the channel's positions`);
    }
    for (const [i, s] of [b1, b2, b3].entries()) {
      assert.deepEqual(s.entries('inbox'), bobInbox, `bob tab ${i}: the receiver's copies are positions of his own inbox, the same in every tab`);
      assert.deepEqual(s.entries(`channel:${ch}`), chan, `bob tab ${i}: the channel's positions, the same as alice's`);
    }
    assert.deepEqual(c1.entries('inbox'), [pm(fromCarol, carol, bob, 'hi bob', 1)], 'carol: her first inbox entry is 1');
    assert.equal(c1.allEntries().length, 1);
  });

  it('several senders fire at one inbox at once: each of the receiver\'s tabs sees positions 1..n in order, without gap or repeat, the same message at each position', async () => {
    const N = 50;
    const [bob, ...senders] = users('bob', 's1', 's2', 's3', 's4');
    const tabs = [await open(server, bob, { gateway: 0 }), await open(server, bob, { gateway: 1 })];
    const from = [];
    for (const [i, u] of senders.entries()) from.push(await open(server, u, { gateway: i }));
    const acks = await Promise.all(from.map((s, k) => Promise.all(Array.from({ length: N },
      (_, i) => send(s.socket, { to: bob, content: `s${k}-${i}` }, 15_000)))));
    acks.flat().forEach((ack, i) => assertOkAck(ack, `ack ${i}`));
    const total = N * senders.length;
    for (const t of tabs) await t.reach('inbox', total, 15_000);
    for (const s of from) await s.reach('inbox', N, 15_000);
    await sleep(QUIET_MS);
    for (const t of [...tabs, ...from]) assertGapFree(t);
    const seen = tabs[0].entries('inbox');
    assert.deepEqual(seen.map((e) => e.seq), Array.from({ length: total }, (_, i) => i + 1), 'bob\'s inbox: 1..n, once each, in order');
    assert.deepEqual(tabs[1].entries('inbox'), seen, 'the other tab (another gateway) sees the same message at each position');
    for (const [k, u] of senders.entries()) {
      assert.deepEqual(seen.filter((e) => e.senderId === u).map((e) => e.content), Array.from({ length: N }, (_, i) => `s${k}-${i}`),
        `sender ${k}'s messages in emission order`);
      assert.deepEqual(from[k].entries('inbox').map((e) => [e.seq, e.id]), acks[k].map((ack, i) => [i + 1, ack.id]),
        `sender ${k}: its own copies are positions 1..${N} of its own inbox`);
    }
  });

  it('creating a channel with members [b, c]: MEMBERSHIP_CHANGE 1 (creator), 2 (b), 3 (c) on the channel; each from its own entry on; an "added" in each member\'s own inbox only', async () => {
    const [alice, bob, carol, dave] = users('alice', 'bob', 'carol', 'dave');
    const [a, b1, c, d] = await openAll(server, alice, bob, carol, dave);
    const b2 = await open(server, bob, { transports: ['polling'] });
    const ch = await createChannel(server, server.token(alice), { id: uid('chan'), members: [bob, carol] });
    const cs = `channel:${ch}`;
    const e1 = mc(cs, 1, ch, alice, 'added', alice);
    const e2 = mc(cs, 2, ch, bob, 'added', alice);
    const e3 = mc(cs, 3, ch, carol, 'added', alice);
    for (const s of [a, b1, b2, c]) await s.reach(cs, 3);
    for (const s of [a, b1, b2, c]) await s.reach('inbox', 1);
    await sleep(QUIET_MS);
    assert.deepEqual(a.entries(cs), [e1, e2, e3], 'the creator sees the channel from 1: itself, then b, then c, byUserId the creator');
    assert.deepEqual(b1.entries(cs), [e2, e3], 'b sees the channel from its own entry (2) on');
    assert.deepEqual(b2.entries(cs), [e2, e3], 'b\'s second tab too');
    assert.deepEqual(c.entries(cs), [e3], 'c sees the channel from its own entry (3) on');
    assert.deepEqual(a.entries('inbox'), [mc('inbox', 1, ch, alice, 'added', alice)],
      'the creator\'s inbox holds its own "added" and nothing for adding b and c');
    for (const s of [b1, b2]) assert.deepEqual(s.entries('inbox'), [mc('inbox', 1, ch, bob, 'added', alice)], 'b\'s inbox: its own "added"');
    assert.deepEqual(c.entries('inbox'), [mc('inbox', 1, ch, carol, 'added', alice)], 'c\'s inbox: its own "added"');
    assert.deepEqual(d.log, [], 'a non-member receives nothing');

    // The stream goes on at 4 for everyone.
    const ack = assertOkAck(await send(c.socket, { channelId: ch, content: 'first' }));
    for (const s of [a, b1, b2, c]) await s.gotId(ack.id);
    await sleep(QUIET_MS);
    for (const s of [a, b1, b2, c]) {
      assertGapFree(s);
      assert.deepEqual(s.entries(cs).at(-1), gm(ack, ch, carol, 'first', 4), `${s.user}: the first message after the creation is position 4`);
      assert.equal(s.allEntries().length, s.entries(cs).length + 1, `${s.user}: nothing else arrived`);
    }
    assert.deepEqual(d.log, [], 'a non-member receives nothing');
  });

  it('adding and removing members: MEMBERSHIP_CHANGE on the channel and in the affected user\'s inbox; a removed member\'s last entry of the channel is its removal', async () => {
    const [alice, bob, carol] = users('alice', 'bob', 'carol');
    const [a, b, c1, c2] = await openAll(server, alice, bob, carol, carol);
    const ch = await createChannel(server, server.token(alice), { id: uid('chan'), members: [bob] }); // 1 alice, 2 bob
    const cs = `channel:${ch}`;
    await a.reach(cs, 2);
    await b.reach(cs, 2);

    // A member (not the creator) adds carol: 3.
    const added = await addMember(server.token(bob), ch, carol);
    assert.equal(added.status, 204, JSON.stringify(added.body));
    for (const s of [a, b, c1, c2]) await s.reach(cs, 3);
    for (const s of [c1, c2]) await s.reach('inbox', 1);
    const m4 = assertOkAck(await send(a.socket, { channelId: ch, content: 'm4' })); // 4
    for (const s of [a, b, c1, c2]) await s.gotId(m4.id);

    // The creator removes bob: 5; then messages 6 and 7 after the 204.
    const removed = await removeMember(server.token(alice), ch, bob);
    assert.equal(removed.status, 204, JSON.stringify(removed.body));
    const m6 = assertOkAck(await send(a.socket, { channelId: ch, content: 'm6' }));
    const m7 = assertOkAck(await send(c2.socket, { channelId: ch, content: 'm7' }));
    for (const s of [a, c1, c2]) await s.gotId(m7.id);
    await b.reach('inbox', 2);

    // Carol removes herself: 8; then 9.
    const left = await removeMember(server.token(carol), ch, carol);
    assert.equal(left.status, 204, JSON.stringify(left.body));
    const m9 = assertOkAck(await send(a.socket, { channelId: ch, content: 'm9' }));
    await a.gotId(m9.id);
    for (const s of [c1, c2]) await s.reach('inbox', 2);
    await sleep(QUIET_MS);

    const e1 = mc(cs, 1, ch, alice, 'added', alice);
    const e2 = mc(cs, 2, ch, bob, 'added', alice);
    const e3 = mc(cs, 3, ch, carol, 'added', bob);
    const e4 = gm(m4, ch, alice, 'm4', 4);
    const e5 = mc(cs, 5, ch, bob, 'removed', alice);
    const e6 = gm(m6, ch, alice, 'm6', 6);
    const e7 = gm(m7, ch, carol, 'm7', 7);
    const e8 = mc(cs, 8, ch, carol, 'removed', carol);
    const e9 = gm(m9, ch, alice, 'm9', 9);
    for (const s of [a, b, c1, c2]) assertGapFree(s);
    assert.deepEqual(a.entries(cs), [e1, e2, e3, e4, e5, e6, e7, e8, e9], 'the creator sees every entry of the channel');
    assert.deepEqual(a.entries('inbox'), [mc('inbox', 1, ch, alice, 'added', alice)],
      'adding or removing someone else writes nothing to the creator\'s inbox');
    assert.deepEqual(b.entries(cs), [e2, e3, e4, e5],
      'bob: from his own addition to his own removal, the removal last (nothing sent after the 204)');
    assert.deepEqual(b.entries('inbox'), [mc('inbox', 1, ch, bob, 'added', alice), mc('inbox', 2, ch, bob, 'removed', alice)],
      'bob\'s inbox: his own "added", his own "removed", nothing for adding carol');
    for (const [i, s] of [c1, c2].entries()) {
      assert.deepEqual(s.entries(cs), [e3, e4, e5, e6, e7, e8], `carol tab ${i}: from her addition (by bob) to her own leaving, the removal last`);
      assert.deepEqual(s.entries('inbox'), [mc('inbox', 1, ch, carol, 'added', bob), mc('inbox', 2, ch, carol, 'removed', carol)],
        `carol tab ${i}: her inbox holds her own "added" (byUserId bob) and "removed" (byUserId herself)`);
    }
    for (const s of [a, b, c1, c2]) {
      assert.equal(s.allEntries().length, s.entries(cs).length + s.entries('inbox').length, `${s.user}: no other stream`);
    }
  });

  it('removed, then added again while connected: the session gets its removal last, then the channel again from the entry that re-added it', async () => {
    // The contract's gap-free rule ("after n, n + 1") cannot hold across a
    // time out of the channel; read here as: the membership rule wins, a
    // member's sessions get the stream from the entry that (re-)added it.
    const [alice, bob] = users('alice', 'bob');
    const [a, b] = await openAll(server, alice, bob);
    const ch = await createChannel(server, server.token(alice), { id: uid('chan'), members: [bob] }); // 1, 2
    const cs = `channel:${ch}`;
    const m3 = assertOkAck(await send(a.socket, { channelId: ch, content: 'm3' }));
    await b.gotId(m3.id);
    assert.equal((await removeMember(server.token(alice), ch, bob)).status, 204); // 4
    const m5 = assertOkAck(await send(a.socket, { channelId: ch, content: 'm5' }));
    await a.gotId(m5.id);
    assert.equal((await addMember(server.token(alice), ch, bob)).status, 204); // 6
    const m7 = assertOkAck(await send(a.socket, { channelId: ch, content: 'm7' }));
    await b.gotId(m7.id);
    await b.reach('inbox', 3);
    await sleep(QUIET_MS);
    assert.deepEqual(b.entries(cs), [
      mc(cs, 2, ch, bob, 'added', alice), gm(m3, ch, alice, 'm3', 3), mc(cs, 4, ch, bob, 'removed', alice),
      mc(cs, 6, ch, bob, 'added', alice), gm(m7, ch, alice, 'm7', 7),
    ], 'bob: 2..4 (his removal last), nothing of his time out (5), then from his new "added" (6) on');
    assert.deepEqual(b.entries('inbox'), [
      mc('inbox', 1, ch, bob, 'added', alice), mc('inbox', 2, ch, bob, 'removed', alice), mc('inbox', 3, ch, bob, 'added', alice),
    ], 'bob\'s inbox: added, removed, added');
    assertGapFree(a);
  });

  it('history items carry stream and seq: personal history in the caller\'s inbox, channel history in the channel\'s stream (messages only, their seqs skip membership entries)', async () => {
    const [alice, bob, carol] = users('alice', 'bob', 'carol');
    const [a, b, c] = await openAll(server, alice, bob, carol);
    const ch = await createChannel(server, server.token(alice), { id: uid('chan'), members: [bob] }); // ch 1, 2; inboxes 1
    const cs = `channel:${ch}`;
    for (const s of [a, b]) await s.reach('inbox', 1);
    const p1 = assertOkAck(await send(a.socket, { to: bob, content: 'p1', clientMsgId: 'hist-1' })); // alice 2, bob 2
    await b.gotId(p1.id);
    await a.gotId(p1.id);
    const x = assertOkAck(await send(c.socket, { to: bob, content: 'x' })); // bob 3, carol 1
    await b.gotId(x.id);
    const p2 = assertOkAck(await send(b.socket, { to: alice, content: 'p2' })); // alice 3, bob 4
    await a.gotId(p2.id);
    await b.gotId(p2.id);

    const g1 = assertOkAck(await send(a.socket, { channelId: ch, content: 'g1' })); // 3
    await b.gotId(g1.id);
    const g2 = assertOkAck(await send(b.socket, { channelId: ch, content: 'g2' })); // 4
    await a.gotId(g2.id);
    assert.equal((await addMember(server.token(alice), ch, carol)).status, 204); // 5
    await c.reach(cs, 5);
    const g3 = assertOkAck(await send(c.socket, { channelId: ch, content: 'g3' })); // 6
    await a.gotId(g3.id);
    await b.gotId(g3.id);
    assert.equal((await removeMember(server.token(alice), ch, carol)).status, 204); // 7
    const g4 = assertOkAck(await send(a.socket, { channelId: ch, content: 'g4', clientMsgId: 'hist-g4' })); // 8
    await b.gotId(g4.id);
    await sleep(QUIET_MS);
    for (const s of [a, b, c]) assertGapFree(s);

    const bobView = [pm(p2, bob, alice, 'p2', 4), pm(p1, alice, bob, 'p1', 2, 'hist-1')];
    const aliceView = [pm(p2, bob, alice, 'p2', 3), pm(p1, alice, bob, 'p1', 2, 'hist-1')];
    assert.deepEqual((await history(server, server.token(bob), `/api/conversations/${alice}/messages`)).messages, bobView,
      'bob\'s personal history: each item at its position in bob\'s inbox ("stream": "inbox"), newest first');
    assert.deepEqual((await history(server, server.token(alice), `/api/conversations/${bob}/messages`)).messages, aliceView,
      'alice\'s personal history of the same conversation: the positions of her own inbox');
    assert.deepEqual((await history(server, server.token(bob), `/api/conversations/${carol}/messages`)).messages,
      [pm(x, carol, bob, 'x', 3)], 'bob\'s history with carol: position 3 of his inbox');
    assert.deepEqual((await history(server, server.token(carol), `/api/conversations/${bob}/messages`)).messages,
      [pm(x, carol, bob, 'x', 1)], 'carol\'s history with bob: position 1 of her inbox');
    // What the sessions received is what history lists.
    assert.deepEqual(b.entries('inbox').filter((e) => e.senderId !== undefined).reverse().filter((e) => e.senderId === alice || e.receiverId === alice), bobView);

    const chanView = [
      gm(g4, ch, alice, 'g4', 8, 'hist-g4'),
      gm(g3, ch, carol, 'g3', 6),
      gm(g2, ch, bob, 'g2', 4),
      gm(g1, ch, alice, 'g1', 3),
    ];
    assert.deepEqual((await history(server, server.token(bob), `/api/channels/${ch}/messages`)).messages, chanView,
      'channel history: messages only, each at its position in the channel\'s stream (1, 2, 5, 7 are membership entries)');
    assert.deepEqual((await history(server, server.token(alice), `/api/channels/${ch}/messages`, { limit: '2' })).messages,
      chanView.slice(0, 2), 'a page of channel history carries the same positions');
    assert.deepEqual(b.entries(cs).filter((e) => e.change === undefined).reverse(), chanView,
      'the channel history equals the delivered messages');
  });

  it('resume on another gateway: exactly the missed entries in order per stream, then RESUMED { replayed, complete: true }, then live events from the next position, no duplicate at the seam', async () => {
    const [alice, bob, carol] = users('alice', 'bob', 'carol');
    const b = await open(server, bob, { gateway: 2 });
    const c = await open(server, carol, { gateway: 1 });
    const a0 = await open(server, alice, { gateway: 0 });
    const ch = await createChannel(server, server.token(bob), { id: uid('chan'), members: [alice, carol] }); // 1 bob, 2 alice, 3 carol
    const cs = `channel:${ch}`;
    const p1 = assertOkAck(await send(b.socket, { to: alice, content: 'p1' })); // alice inbox 2
    await a0.gotId(p1.id);
    const g1 = assertOkAck(await send(c.socket, { channelId: ch, content: 'g1' })); // 4
    await a0.gotId(g1.id);
    await a0.reach('inbox', 2);
    await a0.reach(cs, 4);
    await sleep(QUIET_MS);
    assertGapFree(a0);
    const positions = a0.positions();
    assert.deepEqual(positions, { inbox: 2, [cs]: 4 }, `alice's highest positions before the disconnect (every event carries "stream" and "seq"): ${a0.dump()}`);
    await closeAndSettle(server, a0.socket);

    // Offline: alice's inbox 3..5 from bob, 6 from carol; the channel 5, 6 from carol, 7 from bob.
    const offP = [];
    for (let i = 0; i < 3; i++) offP.push(assertOkAck(await send(b.socket, { to: alice, content: `off${i}` })));
    await b.gotId(offP[2].id);
    const q1 = assertOkAck(await send(c.socket, { to: alice, content: 'q1', clientMsgId: 'resume-q1' }));
    await c.gotId(q1.id);
    const offG = [];
    offG.push(assertOkAck(await send(c.socket, { channelId: ch, content: 'off-g0' })));
    offG.push(assertOkAck(await send(c.socket, { channelId: ch, content: 'off-g1' })));
    await c.gotId(offG[1].id);
    offG.push(assertOkAck(await send(b.socket, { channelId: ch, content: 'off-g2' })));
    await b.gotId(offG[2].id);
    const missedInbox = [
      ...offP.map((ack, i) => pm(ack, bob, alice, `off${i}`, 3 + i)),
      pm(q1, carol, alice, 'q1', 6, 'resume-q1'),
    ];
    const missedChan = [
      gm(offG[0], ch, carol, 'off-g0', 5),
      gm(offG[1], ch, carol, 'off-g1', 6),
      gm(offG[2], ch, bob, 'off-g2', 7),
    ];

    // Live messages flow while alice reconnects to another gateway.
    const LIVE = 20;
    const liveP = [];
    const liveG = [];
    const sending = (async () => {
      for (let i = 0; i < LIVE; i++) {
        liveP.push(send(b.socket, { to: alice, content: `live${i}` }, 15_000));
        liveG.push(send(c.socket, { channelId: ch, content: `live-g${i}` }, 15_000));
        await sleep(5);
      }
    })();
    await sleep(10);
    const a1 = await open(server, alice, { gateway: 1, resume: positions });
    await sending;
    const lp = (await Promise.all(liveP)).map((x, i) => assertOkAck(x, `live ack ${i}`));
    const lg = (await Promise.all(liveG)).map((x, i) => assertOkAck(x, `live group ack ${i}`));
    await a1.resumed();
    await a1.reach('inbox', 6 + LIVE, 15_000);
    await a1.reach(cs, 7 + LIVE, 15_000);
    await sleep(QUIET_MS);

    assertGapFree(a1);
    const inbox = [...missedInbox, ...lp.map((ack, i) => pm(ack, bob, alice, `live${i}`, 7 + i))];
    const chan = [...missedChan, ...lg.map((ack, i) => gm(ack, ch, carol, `live-g${i}`, 8 + i))];
    assert.deepEqual(a1.entries('inbox'), inbox, 'inbox: every entry after the given position once, in order, replay then live');
    assert.deepEqual(a1.entries(cs), chan, 'channel: every entry after the given position once, in order, replay then live');
    assert.equal(a1.allEntries().length, inbox.length + chan.length, 'nothing else');
    // What was stored before the reconnect began is replayed before RESUMED;
    // what arrived meanwhile may be either side of it, each once.
    const { before: pre } = a1.split();
    const preInbox = Session.entriesOf(pre, 'inbox');
    const preChan = Session.entriesOf(pre, cs);
    assert.deepEqual(preInbox.slice(0, missedInbox.length), missedInbox, 'the missed inbox entries come before RESUMED');
    assert.deepEqual(preChan.slice(0, missedChan.length), missedChan, 'the missed channel entries come before RESUMED');
    assertReplay(a1, { inbox: inbox.slice(0, preInbox.length), [cs]: chan.slice(0, preChan.length) });
    assert.deepEqual(a0.entries('inbox').map((e) => e.seq), [1, 2], 'the closed session got nothing after the disconnect');
  });

  it('a client resuming again and again on other gateways while two senders keep sending sees every entry of each stream exactly once, in order', async () => {
    const [alice, bob, carol] = users('alice', 'bob', 'carol');
    const b = await open(server, bob, { gateway: 0 });
    const c = await open(server, carol, { gateway: 1 });
    const ch = await createChannel(server, server.token(bob), { id: uid('chan'), members: [alice, carol] }); // 1 bob, 2 alice, 3 carol; alice inbox 1
    const cs = `channel:${ch}`;
    const ROUNDS = 6;
    // Each session: what it was given, and what it handed on (its highest
    // positions when the client closed it: anything later it shows is the
    // next session's to replay).
    const runs = [];
    let given = { inbox: 0 };
    let s = await open(server, alice, { gateway: 2, resume: given });
    let stop = false;
    const acksP = [];
    const acksG = [];
    const traffic = (async () => {
      for (let i = 0; !stop; i++) {
        acksP.push(send(b.socket, { to: alice, content: `p${i}` }, 15_000));
        acksG.push(send(c.socket, { channelId: ch, content: `g${i}` }, 15_000));
        await sleep(3);
      }
    })();
    for (let r = 0; r < ROUNDS; r++) {
      await sleep(40 + 15 * r);
      await s.resumed();
      const handed = { ...given };
      for (const [k, v] of Object.entries(s.positions())) handed[k] = Math.max(handed[k] ?? 0, v);
      runs.push({ s, given, handed });
      await s.close();
      given = handed;
      s = await open(server, alice, { gateway: r, resume: given });
    }
    stop = true;
    await traffic;
    const P = (await Promise.all(acksP)).map((x, i) => assertOkAck(x, `ack p${i}`));
    const G = (await Promise.all(acksG)).map((x, i) => assertOkAck(x, `ack g${i}`));
    await s.resumed();
    await s.reach('inbox', 1 + P.length, 15_000);
    await s.reach(cs, 3 + G.length, 15_000);
    await sleep(QUIET_MS);
    runs.push({ s, given, handed: null });

    const want = {
      inbox: [mc('inbox', 1, ch, alice, 'added', bob), ...P.map((ack, i) => pm(ack, bob, alice, `p${i}`, 2 + i))],
      [cs]: [mc(cs, 2, ch, alice, 'added', bob), mc(cs, 3, ch, carol, 'added', bob), ...G.map((ack, i) => gm(ack, ch, carol, `g${i}`, 4 + i))],
    };
    const got = { inbox: [], [cs]: [] };
    for (const [r, run] of runs.entries()) {
      assertGapFree(run.s);
      const resumed = run.s.events('RESUMED');
      assert.equal(resumed.length, 1, `session ${r}: one RESUMED`);
      assert.deepEqual(resumed[0], { replayed: run.s.split().before.filter((x) => ENTRY_EVENTS.has(x.event)).length, complete: true },
        `session ${r}: RESUMED { replayed: <entries before it>, complete: true }`);
      for (const stream of Object.keys(got)) {
        const entries = run.s.entries(stream);
        const from = stream === 'inbox' ? run.given.inbox : (run.given[stream] ?? 1);
        if (entries.length) {
          assert.equal(entries[0].seq, from + 1, `session ${r}: "${stream}" resumes right after the given position ${from}`);
        }
        got[stream].push(...entries.filter((e) => run.handed === null || e.seq <= run.handed[stream]));
      }
    }
    assert.deepEqual(got.inbox, want.inbox, 'the inbox across all sessions: every entry once, in order');
    assert.deepEqual(got[cs], want[cs], 'the channel across all sessions: from the entry that added alice, every entry once, in order');
  });

  it('resume after being added to a channel while offline: the inbox entry and the channel from the entry that added one, without listing the channel', async () => {
    const [alice, bob, carol] = users('alice', 'bob', 'carol');
    const b = await open(server, bob, { gateway: 1 });
    const c = await open(server, carol, { gateway: 2 });
    const a0 = await open(server, alice, { gateway: 0 });
    const hi = assertOkAck(await send(b.socket, { to: alice, content: 'hi' })); // alice inbox 1
    await a0.gotId(hi.id);
    assert.deepEqual(a0.positions(), { inbox: 1 }, `alice's position before the disconnect (every event carries "stream" and "seq"): ${a0.dump()}`);
    await closeAndSettle(server, a0.socket);

    const ch = await createChannel(server, server.token(bob), { id: uid('chan'), members: [carol] }); // 1 bob, 2 carol
    const cs = `channel:${ch}`;
    const g1 = assertOkAck(await send(c.socket, { channelId: ch, content: 'g1' })); // 3
    await b.gotId(g1.id);
    assert.equal((await addMember(server.token(bob), ch, alice)).status, 204); // 4; alice inbox 2
    const g2 = assertOkAck(await send(c.socket, { channelId: ch, content: 'g2' })); // 5
    await b.gotId(g2.id);

    const a1 = await open(server, alice, { gateway: 1, resume: { inbox: 1 } });
    await a1.resumed();
    const g3 = assertOkAck(await send(c.socket, { channelId: ch, content: 'g3' })); // 6, live
    await a1.gotId(g3.id);
    await sleep(QUIET_MS);
    assertGapFree(a1);
    assertReplay(a1, {
      inbox: [mc('inbox', 2, ch, alice, 'added', bob)],
      [cs]: [mc(cs, 4, ch, alice, 'added', bob), gm(g2, ch, carol, 'g2', 5)],
    });
    assert.deepEqual(a1.entries(cs), [mc(cs, 4, ch, alice, 'added', bob), gm(g2, ch, carol, 'g2', 5), gm(g3, ch, carol, 'g3', 6)],
      'then the channel goes on live');
    assert.deepEqual(Session.entriesOf(a1.split().after, cs), [gm(g3, ch, carol, 'g3', 6)], 'the live message comes after RESUMED');
  });

  it('resume listing a channel one was removed from after the given position: its entries up to and including the removal, nothing after', async () => {
    const [alice, bob] = users('alice', 'bob');
    const b = await open(server, bob, { gateway: 2 });
    const a0 = await open(server, alice, { gateway: 0 });
    const ch = await createChannel(server, server.token(bob), { id: uid('chan'), members: [alice] }); // 1 bob, 2 alice; alice inbox 1
    const cs = `channel:${ch}`;
    const g1 = assertOkAck(await send(b.socket, { channelId: ch, content: 'g1' })); // 3
    await a0.gotId(g1.id);
    await a0.reach('inbox', 1);
    await sleep(QUIET_MS);
    assert.deepEqual(a0.positions(), { inbox: 1, [cs]: 3 }, `alice's positions before the disconnect (every event carries "stream" and "seq"): ${a0.dump()}`);
    await closeAndSettle(server, a0.socket);

    const g2 = assertOkAck(await send(b.socket, { channelId: ch, content: 'g2' })); // 4
    await b.gotId(g2.id);
    assert.equal((await removeMember(server.token(bob), ch, alice)).status, 204); // 5; alice inbox 2
    const g3 = assertOkAck(await send(b.socket, { channelId: ch, content: 'g3' })); // 6
    await b.gotId(g3.id);

    const a1 = await open(server, alice, { gateway: 1, resume: { inbox: 1, [cs]: 3 } });
    await a1.resumed();
    const g4 = assertOkAck(await send(b.socket, { channelId: ch, content: 'g4' })); // 7
    await b.gotId(g4.id);
    const ping = assertOkAck(await send(b.socket, { to: alice, content: 'ping' })); // alice inbox 3
    await a1.gotId(ping.id);
    await sleep(QUIET_MS);
    assertGapFree(a1);
    assertReplay(a1, {
      inbox: [mc('inbox', 2, ch, alice, 'removed', bob)],
      [cs]: [gm(g2, ch, bob, 'g2', 4), mc(cs, 5, ch, alice, 'removed', bob)],
    });
    assert.deepEqual(a1.entries(cs), [gm(g2, ch, bob, 'g2', 4), mc(cs, 5, ch, alice, 'removed', bob)],
      'nothing of the channel after the removal, neither replayed nor live');
    assert.deepEqual(a1.entries('inbox').at(-1), pm(ping, bob, alice, 'ping', 3), 'the inbox goes on live');
  });

  describe('invalid_resume', () => {
    // owner: inbox 1 (added to chan), 2 (a message to peer); chan: 1 owner, 2 a message.
    // other: a channel owner never belonged to.
    let owner; let peer; let stranger; let chan; let other;
    before(async () => {
      [owner, peer, stranger] = users('owner', 'peer', 'stranger');
      chan = await createChannel(server, server.token(owner), { id: uid('chan') });
      other = await createChannel(server, server.token(stranger), { id: uid('other') });
      const o = await open(server, owner);
      const p = assertOkAck(await send(o.socket, { to: peer, content: 'x' }));
      const g = assertOkAck(await send(o.socket, { channelId: chan, content: 'y' }));
      await o.gotId(p.id);
      await o.gotId(g.id);
      await o.close();
    });

    const cases = [
      ['a resume without inbox', () => ({})],
      ['a resume with a channel but without inbox', () => ({ [`channel:${chan}`]: 0 })],
      ['an inbox position beyond the inbox\'s head', () => ({ inbox: 3 })],
      ['an inbox position far beyond the head', () => ({ inbox: 1_000_000 })],
      ['a channel position beyond the channel\'s head', () => ({ inbox: 2, [`channel:${chan}`]: 3 })],
      ['an unknown stream "foo"', () => ({ inbox: 0, foo: 0 })],
      ['an unknown stream "channel:" (no id)', () => ({ inbox: 0, 'channel:': 0 })],
      ['an unknown stream "inbox:x"', () => ({ inbox: 0, 'inbox:x': 0 })],
      ['an unknown stream "inbox:<own id>"', () => ({ inbox: 0, [`inbox:${owner}`]: 0 })],
      ['an unknown stream "channel:<id>:x"', () => ({ inbox: 0, [`channel:${chan}:x`]: 0 })],
      ['an unknown stream "Channel:<id>"', () => ({ inbox: 0, [`Channel:${chan}`]: 0 })],
      ['a stream name with an invalid channel id', () => ({ inbox: 0, 'channel:a b': 0 })],
      ['a channel id of 65 characters', () => ({ inbox: 0, [`channel:${'c'.repeat(65)}`]: 0 })],
      ['a channel that does not exist', () => ({ inbox: 0, [`channel:${uid('nochan')}`]: 0 })],
      ['a channel the user never belonged to', () => ({ inbox: 0, [`channel:${other}`]: 0 })],
      ['a negative inbox position', () => ({ inbox: -1 })],
      ['a negative channel position', () => ({ inbox: 0, [`channel:${chan}`]: -1 })],
      ['a fractional position', () => ({ inbox: 1.5 })],
      ['a string position', () => ({ inbox: '1' })],
      ['a null position', () => ({ inbox: null })],
      ['a boolean position', () => ({ inbox: true })],
      ['an array position', () => ({ inbox: [1] })],
      ['an object position', () => ({ inbox: { seq: 1 } })],
      ['a string resume', () => 'inbox'],
      ['a numeric resume', () => 5],
      ['a boolean resume', () => true],
      ['an array resume', () => [['inbox', 0]]],
      ['an empty array resume', () => []],
    ];
    for (const [name, resumeOf] of cases) {
      it(`refuses ${name}: connect_error "invalid_resume", nothing bound`, async () => {
        const keysBefore = await metric(server, 'fanout_bound_keys');
        await assertInvalidResume(server, owner, resumeOf(), name);
        const keysAfter = await metric(server, 'fanout_bound_keys');
        if (keysBefore !== null && keysAfter !== null) {
          assert.ok(keysAfter <= keysBefore, `nothing is bound for a refused resume (fanout_bound_keys ${keysBefore} -> ${keysAfter})`);
        }
      });
    }

    it('accepts valid resumes (sanity: the refusals above are about resume): at the heads nothing is replayed; from 0, everything', async () => {
      const cs = `channel:${chan}`;
      const atHead = await open(server, owner, { gateway: 1, resume: { inbox: 2, [cs]: 2 } });
      await atHead.resumed();
      await sleep(QUIET_MS);
      assertReplay(atHead, { inbox: [], [cs]: [] });
      await atHead.close();
      // From inbox 0: the inbox, and the channel from the entry that added
      // the owner (its 1), without listing it.
      const fromZero = await open(server, owner, { gateway: 2, resume: { inbox: 0 } });
      await fromZero.resumed();
      await sleep(QUIET_MS);
      assertGapFree(fromZero);
      assert.deepEqual(fromZero.entries('inbox').map((e) => [e.seq, e.change ?? e.content]), [[1, 'added'], [2, 'x']],
        'the whole inbox from 0');
      assert.deepEqual(fromZero.entries(cs).map((e) => [e.seq, e.change ?? e.content]), [[1, 'added'], [2, 'y']],
        'the channel from the entry that added the owner');
      assert.deepEqual(fromZero.events('RESUMED'), [{ replayed: 4, complete: true }]);
      // A fresh user's empty inbox: position 0 is its head.
      const fresh = await open(server, uid('fresh'), { resume: { inbox: 0 } });
      await fresh.resumed();
      assert.deepEqual(fresh.events('RESUMED'), [{ replayed: 0, complete: true }]);
    });
  });

  it('a connection without resume behaves as before: live events only, no RESUMED', async () => {
    const [alice, bob] = users('alice', 'bob');
    const b = await open(server, bob, { gateway: 0 });
    const ch = await createChannel(server, server.token(bob), { id: uid('chan'), members: [alice] }); // 1, 2; alice inbox 1
    const cs = `channel:${ch}`;
    const p1 = assertOkAck(await send(b.socket, { to: alice, content: 'p1' })); // alice inbox 2
    const g1 = assertOkAck(await send(b.socket, { channelId: ch, content: 'g1' })); // 3
    await b.gotId(p1.id);
    await b.gotId(g1.id);

    const a = await open(server, alice, { gateway: 1 });
    await sleep(QUIET_MS);
    assert.deepEqual(a.log, [], 'nothing from before the connection, and no RESUMED');
    const p2 = assertOkAck(await send(b.socket, { to: alice, content: 'p2' })); // alice inbox 3
    const g2 = assertOkAck(await send(b.socket, { channelId: ch, content: 'g2' })); // 4
    await a.gotId(p2.id);
    await a.gotId(g2.id);
    await sleep(QUIET_MS);
    // Two streams: they may interleave in any order.
    assert.deepEqual(a.entries('inbox'), [pm(p2, bob, alice, 'p2', 3)], 'live events only, at their positions (the inbox goes on from its head)');
    assert.deepEqual(a.entries(cs), [gm(g2, ch, bob, 'g2', 4)], 'live events only, at their positions (the channel goes on from its head)');
    assert.deepEqual(a.log.map((x) => x.event).sort(), ['GROUP_MESSAGE_RECEIVE', 'MESSAGE_RECEIVE'], `nothing else, no RESUMED: ${a.dump()}`);
  });
});

describe('positions and resume: the replay limit (FANOUT_GATEWAY__REPLAY_LIMIT=5)', () => {
  const LIMIT = 5;
  let server;
  before(async () => { server = await startServer({ env: { ...FAST, FANOUT_GATEWAY__REPLAY_LIMIT: String(LIMIT) } }); });
  after(async () => {
    for (const s of opened) s.close();
    opened.clear();
    await server?.stop();
  });

  /**
   * Alice at inbox 2 and the channel at 3 goes offline; bob then sends
   * `personal` personal messages and `group` channel messages; alice
   * resumes on another gateway. Returns what she missed and her session.
   */
  async function missWhileOffline(personal, group) {
    const [alice, bob] = users('alice', 'bob');
    const b = await open(server, bob, { gateway: 2 });
    const a0 = await open(server, alice, { gateway: 0 });
    const p0 = assertOkAck(await send(b.socket, { to: alice, content: 'p0' })); // alice inbox 1
    await a0.gotId(p0.id);
    const ch = await createChannel(server, server.token(bob), { id: uid('chan'), members: [alice] }); // 1, 2; alice inbox 2
    const cs = `channel:${ch}`;
    const g0 = assertOkAck(await send(b.socket, { channelId: ch, content: 'g0' })); // 3
    await a0.gotId(g0.id);
    await a0.reach('inbox', 2);
    await sleep(QUIET_MS);
    assert.deepEqual(a0.positions(), { inbox: 2, [cs]: 3 }, `alice's positions before the disconnect (every event carries "stream" and "seq"): ${a0.dump()}`);
    await closeAndSettle(server, a0.socket);

    const inbox = [];
    for (let i = 0; i < personal; i++) {
      const ack = assertOkAck(await send(b.socket, { to: alice, content: `p${i + 1}` }));
      inbox.push(pm(ack, bob, alice, `p${i + 1}`, 3 + i));
    }
    const chan = [];
    for (let i = 0; i < group; i++) {
      const ack = assertOkAck(await send(b.socket, { channelId: ch, content: `g${i + 1}` }));
      chan.push(gm(ack, ch, bob, `g${i + 1}`, 4 + i));
    }
    for (const e of [...inbox, ...chan]) await b.gotId(e.id);
    const a1 = await open(server, alice, { gateway: 1, resume: { inbox: 2, [cs]: 3 } });
    await a1.resumed();
    await sleep(QUIET_MS);
    return { alice, bob, b, ch, cs, inbox, chan, a1 };
  }

  /** After RESUMED, bob's next messages reach alice live at the streams' next positions. */
  async function liveContinues({ alice, bob, b, ch, cs, inbox, chan, a1 }) {
    const p = assertOkAck(await send(b.socket, { to: alice, content: 'live' }));
    const g = assertOkAck(await send(b.socket, { channelId: ch, content: 'live-g' }));
    await a1.gotId(p.id);
    await a1.gotId(g.id);
    await sleep(QUIET_MS);
    const { after: post } = a1.split();
    assert.deepEqual(Session.entriesOf(post, 'inbox'), [pm(p, bob, alice, 'live', 3 + inbox.length)],
      'after RESUMED, the inbox goes on live at its head + 1');
    assert.deepEqual(Session.entriesOf(post, cs), [gm(g, ch, bob, 'live-g', 4 + chan.length)],
      'after RESUMED, the channel goes on live at its head + 1');
  }

  it('more inbox entries missing than the gateway replays: RESUMED { complete: false, incomplete: ["inbox"] }, then live events', async () => {
    const run = await missWhileOffline(8, 2);
    assertReplay(run.a1, { inbox: run.inbox, [run.cs]: run.chan }, { incomplete: ['inbox'], limit: LIMIT });
    await liveContinues(run);
  });

  it('more channel entries missing than the gateway replays: RESUMED { complete: false, incomplete: ["channel:<id>"] }, then live events', async () => {
    const run = await missWhileOffline(1, 8);
    assertReplay(run.a1, { inbox: run.inbox, [run.cs]: run.chan }, { incomplete: [run.cs], limit: LIMIT });
    await liveContinues(run);
  });

  it('exactly as many missing as the gateway replays: complete', async () => {
    const run = await missWhileOffline(LIMIT, 1);
    assertReplay(run.a1, { inbox: run.inbox, [run.cs]: run.chan });
    await liveContinues(run);
  });
});
