// Personal messages: MESSAGE_RECEIVE reaches every connected session of the
// receiver and of the sender (the sending session included), once per
// session, also for a message to oneself; exact payload shapes; multi-tab
// sessions; both transports.

import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, uid, users, collect, send, assertOkAck, personalEvent, history, closeAndSettle,
  QUIET_MS, sleep, UUID_V7, inboxAt, assertSeqRun,
} from './harness.mjs';

describe('personal messages', () => {
  let server;
  before(async () => { server = await startServer(); });
  after(async () => { await server?.stop(); });

  it('delivers to every session of the receiver and of the sender, once each, with the exact shape', async () => {
    const [alice, bob, carol] = users('alice', 'bob', 'carol');
    const [a1, a2, b1, b2, c1] = await server.sessions(alice, alice, bob, bob, carol);
    const ev = [a1, a2, b1, b2, c1].map((s) => collect(s, 'MESSAGE_RECEIVE'));
    const groupEv = [a1, a2, b1, b2, c1].map((s) => collect(s, 'GROUP_MESSAGE_RECEIVE'));

    const ack1 = assertOkAck(await send(a1, { to: bob, content: 'hello bob' }));
    const ack2 = assertOkAck(await send(a1, { to: bob, content: 'with id', clientMsgId: 'A.b:c-1_2' }));
    assert.notEqual(ack1.id, ack2.id);

    // Fresh users: each message is at the same position of both inboxes.
    const e1 = inboxAt(personalEvent(ack1, alice, bob, 'hello bob'), 1);
    const e2 = inboxAt(personalEvent(ack2, alice, bob, 'with id', 'A.b:c-1_2'), 2);
    assert.equal('clientMsgId' in e1, false);
    for (const c of ev.slice(0, 4)) await c.waitFor(2);
    // A later message on the same path: after it, nothing more may arrive.
    const ack3 = assertOkAck(await send(b2, { to: alice, content: 'sentinel' }));
    const e3 = inboxAt(personalEvent(ack3, bob, alice, 'sentinel'), 3);
    for (const c of ev.slice(0, 4)) await c.waitFor(3);
    await sleep(QUIET_MS);
    for (const [i, c] of ev.slice(0, 4).entries()) {
      assert.deepEqual(c.items, [e1, e2, e3], `session ${i} got each message exactly once, in order, exactly shaped`);
    }
    assert.deepEqual(ev[4].items, [], 'an unrelated user receives nothing');
    for (const g of groupEv) assert.deepEqual(g.items, [], 'no group events for personal messages');

    // Stored once each, shaped like the delivered events, newest first.
    const h = await history(server, server.token(alice), `/api/conversations/${bob}/messages`);
    assert.deepEqual(h, { messages: [e3, e2, e1], nextBefore: null });
  });

  it('delivers a message to oneself once to each of the sender\'s sessions', async () => {
    const alice = uid('alice');
    const [a1, a2, a3] = await server.sessions(alice, alice, alice);
    const ev = [a1, a2, a3].map((s) => collect(s, 'MESSAGE_RECEIVE'));
    const ack = assertOkAck(await send(a2, { to: alice, content: 'note to self', clientMsgId: 'self-1' }));
    // A message to oneself has one position in one's inbox.
    const e = inboxAt(personalEvent(ack, alice, alice, 'note to self', 'self-1'), 1);
    for (const c of ev) await c.waitFor(1);
    const ack2 = assertOkAck(await send(a2, { to: alice, content: 'sentinel' }));
    const e2 = inboxAt(personalEvent(ack2, alice, alice, 'sentinel'), 2);
    for (const c of ev) await c.waitFor(2);
    await sleep(QUIET_MS);
    for (const c of ev) assert.deepEqual(c.items, [e, e2]);
    const h = await history(server, server.token(alice), `/api/conversations/${alice}/messages`);
    assert.deepEqual(h, { messages: [e2, e], nextBefore: null });
  });

  it('delivers to a receiver with no other sender session (single sending session receives its own message)', async () => {
    const [alice, bob] = users('alice', 'bob');
    const [a, b] = await server.sessions(alice, bob);
    const ea = collect(a, 'MESSAGE_RECEIVE');
    const eb = collect(b, 'MESSAGE_RECEIVE');
    const ack = assertOkAck(await send(a, { to: bob, content: 'x' }));
    const e = inboxAt(personalEvent(ack, alice, bob, 'x'), 1);
    assert.deepEqual((await ea.waitFor(1))[0], e);
    assert.deepEqual((await eb.waitFor(1))[0], e);
    // The ack's createdAt is the delivered event's createdAt, to the millisecond.
    assert.equal(ea.items[0].createdAt, ack.createdAt);
    assert.match(ea.items[0].id, UUID_V7);
  });

  it('accepts a message to a user who has never connected; it is stored and the sender\'s sessions get it', async () => {
    const [alice, nobody] = users('alice', 'nobody');
    const a = await server.session(alice);
    const ea = collect(a, 'MESSAGE_RECEIVE');
    const ack = assertOkAck(await send(a, { to: nobody, content: 'are you there?' }));
    const e = inboxAt(personalEvent(ack, alice, nobody, 'are you there?'), 1);
    assert.deepEqual(await ea.waitFor(1), [e]);
    const h = await history(server, server.token(nobody), `/api/conversations/${alice}/messages`);
    assert.deepEqual(h.messages, [e]);
  });

  it('multi-tab: closing one session leaves the other receiving; closing all stops delivery; history keeps everything', async () => {
    const [alice, bob] = users('alice', 'bob');
    const [a, b1, b2] = await server.sessions(alice, bob, bob);
    const ea = collect(a, 'MESSAGE_RECEIVE');
    const eb1 = collect(b1, 'MESSAGE_RECEIVE');
    const eb2 = collect(b2, 'MESSAGE_RECEIVE');

    const ack1 = assertOkAck(await send(a, { to: bob, content: 'm1' }));
    const m1 = inboxAt(personalEvent(ack1, alice, bob, 'm1'), 1);
    await eb1.waitFor(1);
    await eb2.waitFor(1);

    await closeAndSettle(server, b1);
    const ack2 = assertOkAck(await send(a, { to: bob, content: 'm2' }));
    const m2 = inboxAt(personalEvent(ack2, alice, bob, 'm2'), 2);
    assert.deepEqual(await eb2.waitFor(2), [m1, m2], 'the remaining tab still receives');

    // A new tab of the same user after one closed binds correctly too.
    const b3 = await server.session(bob);
    const eb3 = collect(b3, 'MESSAGE_RECEIVE');
    const ack3 = assertOkAck(await send(a, { to: bob, content: 'm3' }));
    const m3 = inboxAt(personalEvent(ack3, alice, bob, 'm3'), 3);
    assert.deepEqual(await eb2.waitFor(3), [m1, m2, m3]);
    assert.deepEqual(await eb3.waitFor(1), [m3]);

    await closeAndSettle(server, b2);
    await closeAndSettle(server, b3);
    // Sent after every bob session closed: alice's own session is the
    // sentinel on the same route.
    const ack4 = assertOkAck(await send(a, { to: bob, content: 'm4' }));
    const m4 = inboxAt(personalEvent(ack4, alice, bob, 'm4'), 4);
    assert.deepEqual(await ea.waitFor(4), [m1, m2, m3, m4]);
    await sleep(QUIET_MS);
    assert.deepEqual(eb1.items, [m1]);
    assert.deepEqual(eb2.items, [m1, m2, m3]);
    assert.deepEqual(eb3.items, [m3]);
    const h = await history(server, server.token(bob), `/api/conversations/${alice}/messages`);
    assert.deepEqual(h, { messages: [m4, m3, m2, m1], nextBefore: null });

    // Bob comes back: live delivery resumes.
    const b4 = await server.session(bob);
    const eb4 = collect(b4, 'MESSAGE_RECEIVE');
    const ack5 = assertOkAck(await send(a, { to: bob, content: 'm5' }));
    const m5 = inboxAt(personalEvent(ack5, alice, bob, 'm5'), 5);
    assert.deepEqual((await eb4.waitFor(1)).at(-1), m5);
  });

  for (const transports of [['polling'], ['websocket'], ['polling', 'websocket']]) {
    it(`works over transports ${transports.join('+')}`, async () => {
      const [alice, bob] = users('alice', 'bob');
      const a = await server.session(alice, { transports });
      const b = await server.session(bob, { transports });
      const eb = collect(b, 'MESSAGE_RECEIVE');
      const ea = collect(a, 'MESSAGE_RECEIVE');
      const content = `über ${transports.join('+')} ✓ 😀`;
      const ack = assertOkAck(await send(a, { to: bob, content, clientMsgId: 'tx-1' }));
      const e = inboxAt(personalEvent(ack, alice, bob, content, 'tx-1'), 1);
      assert.deepEqual(await eb.waitFor(1), [e]);
      assert.deepEqual(await ea.waitFor(1), [e]);
      const back = assertOkAck(await send(b, { to: alice, content: 'back' }));
      const e2 = inboxAt(personalEvent(back, bob, alice, 'back'), 2);
      assert.deepEqual(await ea.waitFor(2), [e, e2]);
    });
  }

  it('an event reaches a client only after the message is stored (history has it when the event arrives)', async () => {
    const [alice, bob] = users('alice', 'bob');
    const [a, b] = await server.sessions(alice, bob);
    const checks = [];
    b.on('MESSAGE_RECEIVE', (e) => {
      // Asked the moment the event arrives.
      checks.push(history(server, server.token(bob), `/api/conversations/${alice}/messages`, { limit: '200' })
        .then((h) => ({ id: e.id, stored: h.messages.some((m) => m.id === e.id) })));
    });
    const eb = collect(b, 'MESSAGE_RECEIVE');
    const acks = await Promise.all(Array.from({ length: 20 }, (_, i) => send(a, { to: bob, content: `s${i}` })));
    acks.forEach((x) => assertOkAck(x));
    await eb.waitFor(20);
    assertSeqRun(eb.items, 'inbox', 1, 'bob\'s inbox');
    const results = await Promise.all(checks);
    assert.equal(results.length, 20);
    for (const r of results) assert.equal(r.stored, true, `message ${r.id} was in history when its event arrived`);
  });
});
