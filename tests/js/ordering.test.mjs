// Ordering: a session's messages, emitted without waiting for acks, are
// accepted in emission order and delivered to every session in that order,
// in a personal conversation and in a channel; messages of several senders
// in one channel reach every session in one same order.

import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, uid, users, collect, send, assertOkAck, personalEvent, groupEvent, history,
  createChannel, QUIET_MS, sleep, inboxAt, channelAt, assertSeqRun,
} from './harness.mjs';

const N = 200;

describe('ordering', () => {
  let server;
  before(async () => {
    // 200 sends at once exceed the default burst of 100; this file is about
    // order, not rate limits.
    server = await startServer({
      env: { FANOUT_LIMITS__MESSAGES_PER_SECOND: '10000', FANOUT_LIMITS__MESSAGE_BURST: '10000', FANOUT_LIMITS__SEND_QUEUE: '10000' },
    });
  });
  after(async () => { await server?.stop(); });

  /** Emits all, then awaits all acks. */
  async function fire(socket, payloads) {
    const pending = payloads.map((p) => send(socket, p, 15_000));
    return Promise.all(pending);
  }

  /**
   * Two senders fire their payloads at once; every collector must then hold
   * each message once, in one order shared by all, each sender's messages in
   * the order sent, at consecutive positions of `stream` from `first` (the
   * one order is the stream's).
   */
  async function twoSendersOneOrder(ev, [sa, userA, pa], [sb, userB, pb], stream, first) {
    const [acksA, acksB] = await Promise.all([fire(sa, pa), fire(sb, pb)]);
    [...acksA, ...acksB].forEach((ack, i) => assertOkAck(ack, `ack ${i}`));
    const total = pa.length + pb.length;
    for (const c of ev) await c.waitFor(total, 15_000);
    await sleep(QUIET_MS);
    const reference = ev[0].items.map((x) => x.id);
    for (const [i, c] of ev.entries()) {
      assert.equal(c.items.length, total, `session ${i}: each message once`);
      assert.deepEqual(c.items.map((x) => x.id), reference, `session ${i}: the same order as every other session`);
      assertSeqRun(c.items, stream, first, `session ${i}`);
      assert.deepEqual(c.items.filter((x) => x.senderId === userA).map((x) => x.content), pa.map((p) => p.content));
      assert.deepEqual(c.items.filter((x) => x.senderId === userB).map((x) => x.content), pb.map((p) => p.content));
    }
  }

  async function allHistory(token, path) {
    const out = [];
    let before;
    for (;;) {
      const page = await history(server, token, path, before ? { limit: '200', before } : { limit: '200' });
      out.push(...page.messages);
      if (!page.nextBefore) return out;
      before = page.nextBefore;
    }
  }

  it(`${N} personal messages fired without awaiting acks arrive in emission order`, async () => {
    const [alice, bob] = users('alice', 'bob');
    const [a1, a2, b1] = await server.sessions(alice, alice, bob);
    const b2 = await server.session(bob, { transports: ['polling'] });
    const ev = [a1, a2, b1, b2].map((s) => collect(s, 'MESSAGE_RECEIVE'));
    const payloads = Array.from({ length: N }, (_, i) => (i % 3 === 0
      ? { to: bob, content: `m${i}`, clientMsgId: `ord-${i}` }
      : { to: bob, content: `m${i}` }));
    const acks = await fire(a1, payloads);
    acks.forEach((ack, i) => assertOkAck(ack, `ack ${i}`));
    assert.equal(new Set(acks.map((x) => x.id)).size, N, 'every message has its own id');
    // Fresh users: message i is at position i + 1 of both inboxes.
    const expected = acks.map((ack, i) => inboxAt(personalEvent(ack, alice, bob, `m${i}`, payloads[i].clientMsgId), i + 1));
    for (const c of ev) await c.waitFor(N, 15_000);
    await sleep(QUIET_MS);
    for (const [i, c] of ev.entries()) {
      assert.deepEqual(c.items.map((x) => x.content), payloads.map((p) => p.content), `session ${i}: emission order`);
      assert.deepEqual(c.items, expected, `session ${i}: exact events`);
    }
    // History, newest first, is the reverse of the emission order.
    const h = await allHistory(server.token(bob), `/api/conversations/${alice}/messages`);
    assert.deepEqual(h, [...expected].reverse());
  });

  it(`${N} group messages fired without awaiting acks arrive in order at every member session`, async () => {
    const [alice, bob, carol] = users('alice', 'bob', 'carol');
    const [a1, a2, b1] = await server.sessions(alice, alice, bob);
    const c1 = await server.session(carol, { transports: ['polling'] });
    const ch = await createChannel(server, server.token(alice), { id: uid('chan'), members: [bob, carol] });
    const ev = [a1, a2, b1, c1].map((s) => collect(s, 'GROUP_MESSAGE_RECEIVE'));
    const payloads = Array.from({ length: N }, (_, i) => ({ channelId: ch, content: `g${i}`, clientMsgId: `gord-${i}` }));
    const acks = await fire(a2, payloads);
    acks.forEach((ack, i) => assertOkAck(ack, `ack ${i}`));
    // Entries 1-3 are the creation's: message i is at position 4 + i.
    const expected = acks.map((ack, i) => channelAt(groupEvent(ack, ch, alice, `g${i}`, `gord-${i}`), 4 + i));
    for (const c of ev) await c.waitFor(N, 15_000);
    await sleep(QUIET_MS);
    for (const [i, c] of ev.entries()) {
      assert.deepEqual(c.items.map((x) => x.content), payloads.map((p) => p.content), `session ${i}: emission order`);
      assert.deepEqual(c.items, expected, `session ${i}: exact events`);
    }
    const h = await allHistory(server.token(carol), `/api/channels/${ch}/messages`);
    assert.deepEqual(h, [...expected].reverse());
  });

  it('several senders into one channel: every session sees one same order, each sender\'s messages in emission order', async () => {
    const [alice, bob, carol] = users('alice', 'bob', 'carol');
    const [a, b, c1, c2] = await server.sessions(alice, bob, carol, carol);
    const ch = await createChannel(server, server.token(alice), { id: uid('chan'), members: [bob, carol] });
    const ev = [a, b, c1, c2].map((s) => collect(s, 'GROUP_MESSAGE_RECEIVE'));
    const M = 100;
    const pa = Array.from({ length: M }, (_, i) => ({ channelId: ch, content: `a${i}` }));
    const pb = Array.from({ length: M }, (_, i) => ({ channelId: ch, content: `b${i}` }));
    await twoSendersOneOrder(ev, [a, alice, pa], [b, bob, pb], `channel:${ch}`, 4);
  });

  it('personal messages in both directions: both parties\' sessions see one same order', async () => {
    const [alice, bob] = users('alice', 'bob');
    const [a1, a2, b1, b2] = await server.sessions(alice, alice, bob, bob);
    const ev = [a1, a2, b1, b2].map((s) => collect(s, 'MESSAGE_RECEIVE'));
    const M = 100;
    const pa = Array.from({ length: M }, (_, i) => ({ to: bob, content: `a${i}` }));
    const pb = Array.from({ length: M }, (_, i) => ({ to: alice, content: `b${i}` }));
    // One conversation: both inboxes hold its messages in one order, from 1.
    await twoSendersOneOrder(ev, [a1, alice, pa], [b2, bob, pb], 'inbox', 1);
  });
});
