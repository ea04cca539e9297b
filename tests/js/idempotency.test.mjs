// Retries: a second send with a clientMsgId the sender already used is a
// retry of the first, whatever its target: the same id in the ack, one
// stored message, one delivery per session.

import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, uid, users, collect, send, assertOkAck, personalEvent, groupEvent, history,
  createChannel, QUIET_MS, sleep, inboxAt, channelAt, assertSeqRun,
} from './harness.mjs';

describe('idempotent retries', () => {
  let server;
  before(async () => { server = await startServer(); });
  after(async () => { await server?.stop(); });

  it('same clientMsgId twice: same id and createdAt in both acks, one delivery, one stored message', async () => {
    const [alice, bob] = users('alice', 'bob');
    const [a, b1, b2] = await server.sessions(alice, bob, bob);
    const ea = collect(a, 'MESSAGE_RECEIVE');
    const eb1 = collect(b1, 'MESSAGE_RECEIVE');
    const eb2 = collect(b2, 'MESSAGE_RECEIVE');

    const first = assertOkAck(await send(a, { to: bob, content: 'once', clientMsgId: 'retry-1' }));
    const e = inboxAt(personalEvent(first, alice, bob, 'once', 'retry-1'), 1);
    await eb1.waitFor(1);
    const second = assertOkAck(await send(a, { to: bob, content: 'once', clientMsgId: 'retry-1' }));
    assert.equal(second.id, first.id, 'the retry\'s ack carries the stored message\'s id');
    assert.equal(second.createdAt, first.createdAt);

    const s = assertOkAck(await send(a, { to: bob, content: 'sentinel' }));
    // The retry took no position: the sentinel is next.
    const se = inboxAt(personalEvent(s, alice, bob, 'sentinel'), 2);
    for (const c of [ea, eb1, eb2]) await c.waitFor(2);
    await sleep(QUIET_MS);
    for (const c of [ea, eb1, eb2]) assert.deepEqual(c.items, [e, se]);
    const h = await history(server, server.token(bob), `/api/conversations/${alice}/messages`);
    assert.deepEqual(h, { messages: [se, e], nextBefore: null });
  });

  it('a retry emitted before the first ack arrived still yields one message', async () => {
    const [alice, bob] = users('alice', 'bob');
    const [a, b] = await server.sessions(alice, bob);
    const eb = collect(b, 'MESSAGE_RECEIVE');
    const [x, y, z] = await Promise.all([
      send(a, { to: bob, content: 'dup', clientMsgId: 'fast' }),
      send(a, { to: bob, content: 'dup', clientMsgId: 'fast' }),
      send(a, { to: bob, content: 'dup', clientMsgId: 'fast' }),
    ]);
    for (const ack of [x, y, z]) assertOkAck(ack);
    assert.equal(y.id, x.id);
    assert.equal(z.id, x.id);
    const s = assertOkAck(await send(a, { to: bob, content: 'sentinel' }));
    await eb.waitFor(2);
    await sleep(QUIET_MS);
    assert.deepEqual(eb.items, [inboxAt(personalEvent(x, alice, bob, 'dup', 'fast'), 1), inboxAt(personalEvent(s, alice, bob, 'sentinel'), 2)]);
    const h = await history(server, server.token(alice), `/api/conversations/${bob}/messages`);
    assert.equal(h.messages.length, 2);
  });

  it('same clientMsgId with a different target (user, channel) or content still yields the first message\'s id', async () => {
    const [alice, bob, carol] = users('alice', 'bob', 'carol');
    const [a, b, c] = await server.sessions(alice, bob, carol);
    const ch = await createChannel(server, server.token(alice), { id: uid('chan'), members: [bob, carol] });
    const eb = collect(b, 'MESSAGE_RECEIVE');
    const ec = collect(c, 'MESSAGE_RECEIVE');
    const gc = collect(c, 'GROUP_MESSAGE_RECEIVE');

    const first = assertOkAck(await send(a, { to: bob, content: 'for bob', clientMsgId: 'k1' }));
    // Inbox positions 1 are the additions to the channel (entries 1-3).
    const e = inboxAt(personalEvent(first, alice, bob, 'for bob', 'k1'), 2);
    for (const retry of [
      { to: carol, content: 'for bob', clientMsgId: 'k1' },
      { to: bob, content: 'different text', clientMsgId: 'k1' },
      { channelId: ch, content: 'for bob', clientMsgId: 'k1' },
      { to: alice, content: 'to myself', clientMsgId: 'k1' },
    ]) {
      const ack = assertOkAck(await send(a, retry));
      assert.equal(ack.id, first.id, `retry ${JSON.stringify(retry)} carries the first id`);
    }

    // Group first, then personal: one scope for both.
    const g = assertOkAck(await send(a, { channelId: ch, content: 'group first', clientMsgId: 'k2' }));
    const again = assertOkAck(await send(a, { to: carol, content: 'group first', clientMsgId: 'k2' }));
    assert.equal(again.id, g.id);
    const ge = channelAt(groupEvent(g, ch, alice, 'group first', 'k2'), 4);

    const s1 = assertOkAck(await send(a, { to: carol, content: 'sentinel c' }));
    const s2 = assertOkAck(await send(a, { to: bob, content: 'sentinel b' }));
    // The retries took no position in any stream.
    const sc = inboxAt(personalEvent(s1, alice, carol, 'sentinel c'), 2);
    const sb = inboxAt(personalEvent(s2, alice, bob, 'sentinel b'), 3);
    await ec.waitFor(1);
    await eb.waitFor(2);
    await gc.waitFor(1);
    await sleep(QUIET_MS);
    assert.deepEqual(eb.items, [e, sb]);
    assert.deepEqual(ec.items, [sc]);
    assert.deepEqual(gc.items, [ge]);
    assert.deepEqual((await history(server, server.token(carol), `/api/conversations/${alice}/messages`)).messages, [sc]);
    assert.deepEqual((await history(server, server.token(bob), `/api/conversations/${alice}/messages`)).messages, [sb, e]);
    assert.deepEqual((await history(server, server.token(carol), `/api/channels/${ch}/messages`)).messages, [ge]);
    assert.deepEqual((await history(server, server.token(alice), `/api/conversations/${alice}/messages`)).messages, []);
  });

  it('the scope is the sender: a retry from another session of the same user is a retry too', async () => {
    const [alice, bob] = users('alice', 'bob');
    // Two tabs on one gateway: it remembers the ack it gave the first.
    const a1 = await server.session(alice, { gateway: 0 });
    const a2 = await server.session(alice, { gateway: 0 });
    const b = await server.session(bob);
    const eb = collect(b, 'MESSAGE_RECEIVE');
    const first = assertOkAck(await send(a1, { to: bob, content: 'x', clientMsgId: 'tab' }));
    const second = assertOkAck(await send(a2, { to: bob, content: 'x', clientMsgId: 'tab' }));
    assert.equal(second.id, first.id);
    // And after reconnecting, to any gateway: once the first send is stored
    // (bob has it), every gateway can know it.
    await eb.waitFor(1);
    a1.close();
    const a3 = await server.session(alice, { gateway: 1 });
    const third = assertOkAck(await send(a3, { to: bob, content: 'x', clientMsgId: 'tab' }));
    assert.equal(third.id, first.id);
    const s = assertOkAck(await send(a2, { to: bob, content: 'sentinel' }));
    await eb.waitFor(2);
    await sleep(QUIET_MS);
    assert.deepEqual(eb.items, [inboxAt(personalEvent(first, alice, bob, 'x', 'tab'), 1), inboxAt(personalEvent(s, alice, bob, 'sentinel'), 2)]);
  });

  it('different senders using the same clientMsgId get different messages', async () => {
    const [alice, bob, carol] = users('alice', 'bob', 'carol');
    const [a, b, c] = await server.sessions(alice, bob, carol);
    const ec = collect(c, 'MESSAGE_RECEIVE');
    const x = assertOkAck(await send(a, { to: carol, content: 'from alice', clientMsgId: 'same' }));
    const y = assertOkAck(await send(b, { to: carol, content: 'from bob', clientMsgId: 'same' }));
    assert.notEqual(x.id, y.id);
    await ec.waitFor(2);
    // Two conversations (alice-carol, bob-carol): no order between them;
    // carol's inbox positions are 1 and 2 in the order she received them.
    assertSeqRun(ec.items, 'inbox', 1, 'carol\'s inbox');
    const at = (ack) => 1 + ec.items.findIndex((m) => m.id === ack.id);
    const byId = (x, y) => (x.id < y.id ? -1 : 1);
    assert.deepEqual([...ec.items].sort(byId), [
      inboxAt(personalEvent(x, alice, carol, 'from alice', 'same'), at(x)),
      inboxAt(personalEvent(y, bob, carol, 'from bob', 'same'), at(y)),
    ].sort(byId));
  });

  it('a retry whose new target is a channel the sender is not in is still a retry of the first send', async () => {
    // "one scope per sender ... a second send with an id the sender already
    // used is a retry of the first, whatever its target".
    const [alice, bob] = users('alice', 'bob');
    const [a, b] = await server.sessions(alice, bob);
    const eb = collect(b, 'MESSAGE_RECEIVE');
    const other = await createChannel(server, server.token(bob), { id: uid('chan'), members: [] });
    const first = assertOkAck(await send(a, { to: bob, content: 'x', clientMsgId: 'nm-retry' }));
    const again = await send(a, { channelId: other, content: 'x', clientMsgId: 'nm-retry' });
    assert.deepEqual(again, { ok: true, id: first.id, createdAt: first.createdAt },
      'the retry is answered with the first message, not refused');
    await eb.waitFor(1);
  });
});

describe('idempotent retries across a gateway restart', () => {
  let server;
  let scenario;
  before(async () => {
    server = await startServer();
    // Alice sends with a clientMsgId and bob gets it; the gateway restarts
    // (the retry cache is gone, the store is not); both reconnect and alice
    // retries, then sends a sentinel.
    const [alice, bob] = users('alice', 'bob');
    let a = await server.session(alice);
    let b = await server.session(bob);
    let eb = collect(b, 'MESSAGE_RECEIVE');
    const first = assertOkAck(await send(a, { to: bob, content: 'survive', clientMsgId: 'restart-1' }));
    const e = inboxAt(personalEvent(first, alice, bob, 'survive', 'restart-1'), 1);
    assert.deepEqual(await eb.waitFor(1), [e]);

    server = await server.restart();
    a = await server.session(alice);
    b = await server.session(bob);
    eb = collect(b, 'MESSAGE_RECEIVE');
    const ea = collect(a, 'MESSAGE_RECEIVE');
    const retry = assertOkAck(await send(a, { to: bob, content: 'survive', clientMsgId: 'restart-1' }));
    const s = assertOkAck(await send(a, { to: bob, content: 'sentinel' }));
    // The retry took no position: the sentinel is 2 in both inboxes.
    const se = inboxAt(personalEvent(s, alice, bob, 'sentinel'), 2);
    await ea.waitUntil((x) => x.id === s.id);
    await eb.waitUntil((x) => x.id === s.id);
    await sleep(QUIET_MS);
    scenario = { alice, bob, e, se, retry, first, ea, eb };
  });
  after(async () => { await server?.stop(); });

  it('a retry after a restart stores nothing new, and any event for it carries the stored id', async () => {
    const { alice, bob, e, se, first, retry, ea, eb } = scenario;
    const h = await history(server, server.token(bob), `/api/conversations/${alice}/messages`);
    assert.deepEqual(h, { messages: [se, e], nextBefore: null });
    for (const x of [...ea.items, ...eb.items]) {
      if (x.id !== se.id) assert.deepEqual(x, e, 'an event for the retry carries the stored message');
    }
    assert.ok(retry.id === first.id || ![...ea.items, ...eb.items].some((x) => x.id === retry.id), 'no event carries a second id');
  });

  it('a retry after a restart is not delivered again to the receiver, who already got it', async () => {
    // "A retry ... must not create ... a second delivery to recipients who
    // already got it."
    const { se, eb } = scenario;
    assert.deepEqual(eb.items, [se]);
  });
});
