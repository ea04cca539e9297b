// Channels: creation through the API (201 {id}, 409 on a duplicate id, the
// creator is a member, connected members start receiving at once), and
// GROUP_MESSAGE_RECEIVE to every session of every member, sender included;
// a non-member's send is refused `not_member` and nothing is delivered or
// stored.

import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, uid, users, collect, send, assertOkAck, assertErrAck, groupEvent, history,
  createChannel, assertHttpError, closeAndSettle, QUIET_MS, sleep, channelAt, membershipEvent, membershipItems,
} from './harness.mjs';

/** A session's items of one stream, in arrival order. */
const ofStream = (items, stream) => items.filter((x) => x.stream === stream);

describe('channels and group messages', () => {
  let server;
  before(async () => { server = await startServer(); });
  after(async () => { await server?.stop(); });

  it('creates a channel: 201 {id}; 409 with a JSON error on a duplicate id', async () => {
    const [alice, bob, id] = users('alice', 'bob', 'chan');
    assert.equal(await createChannel(server, server.token(alice), { id, name: 'Général ✓', members: [bob] }), id);
    const dup = await server.api('POST', '/api/channels', { token: server.token(bob), body: { id, name: 'again', members: [] } });
    assertHttpError(dup, 409, 'duplicate channel id');
    const dup2 = await server.api('POST', '/api/channels', { token: server.token(alice), body: { id, name: 'again', members: [bob] } });
    assertHttpError(dup2, 409, 'duplicate channel id by its creator');
  });

  it('creates a channel without an id: the server picks a valid one', async () => {
    const alice = uid('alice');
    const id = await createChannel(server, server.token(alice), { name: 'no id' });
    assert.match(id, /^[A-Za-z0-9_-]{1,64}$/);
    const h = await history(server, server.token(alice), `/api/channels/${id}/messages`);
    assert.deepEqual(h, { messages: [], nextBefore: null });
  });

  it('refuses a channel with an invalid id or invalid member ids (400)', async () => {
    const alice = uid('alice');
    for (const body of [
      { id: 'a:b', name: 'x', members: [] },
      { id: 'x'.repeat(65), name: 'x', members: [] },
      { id: uid('c'), name: 'x', members: ['bad id'] },
      { id: uid('c'), name: 'x', members: ['y'.repeat(65)] },
    ]) {
      const r = await server.api('POST', '/api/channels', { token: server.token(alice), body });
      assertHttpError(r, 400, JSON.stringify(body));
    }
  });

  it('delivers GROUP_MESSAGE_RECEIVE to every session of every member, the sender\'s included, exactly shaped', async () => {
    const [alice, bob, carol, outsider] = users('alice', 'bob', 'carol', 'out');
    // Connected before the channel exists: they must start receiving at once.
    const [a1, a2, b1, b2, c1, o1] = await server.sessions(alice, alice, bob, bob, carol, outsider);
    const sessions = [a1, a2, b1, b2, c1];
    const ev = sessions.map((s) => collect(s, 'GROUP_MESSAGE_RECEIVE'));
    const personal = [...sessions, o1].map((s) => collect(s, 'MESSAGE_RECEIVE'));
    const outEv = collect(o1, 'GROUP_MESSAGE_RECEIVE');
    const mc = [...sessions, o1].map((s) => collect(s, 'MEMBERSHIP_CHANGE'));

    // Entries 1 (the creator), 2 (bob), 3 (carol: members in id order, bob
    // listed twice counts once); the first message is position 4.
    const ch = await createChannel(server, server.token(alice), { id: uid('chan'), members: [bob, carol, bob] });

    const ack1 = assertOkAck(await send(a1, { channelId: ch, content: 'hi all' }));
    const ack2 = assertOkAck(await send(b2, { channelId: ch, content: 'hi back', clientMsgId: 'g-1' }));
    const ack3 = assertOkAck(await send(c1, { channelId: ch, content: 'ünïcödé 😀' }));
    const e1 = channelAt(groupEvent(ack1, ch, alice, 'hi all'), 4);
    const e2 = channelAt(groupEvent(ack2, ch, bob, 'hi back', 'g-1'), 5);
    const e3 = channelAt(groupEvent(ack3, ch, carol, 'ünïcödé 😀'), 6);
    for (const c of ev) await c.waitFor(3);
    await sleep(QUIET_MS);
    for (const [i, c] of ev.entries()) assert.deepEqual(c.items, [e1, e2, e3], `session ${i}`);
    assert.deepEqual(outEv.items, [], 'a non-member receives nothing');
    // The creation's membership entries: each member's sessions get the
    // channel's stream from the entry that added that member, and the
    // member's own entry in their inbox.
    const added = (seq, userId) => membershipEvent({ seq, channelId: ch, userId, change: 'added', byUserId: alice });
    const inboxAdded = (userId) => membershipEvent({ stream: 'inbox', seq: 1, channelId: ch, userId, change: 'added', byUserId: alice });
    const expectedChanges = [
      [added(1, alice), added(2, bob), added(3, carol)], [added(1, alice), added(2, bob), added(3, carol)],
      [added(2, bob), added(3, carol)], [added(2, bob), added(3, carol)],
      [added(3, carol)],
    ];
    const owners = [alice, alice, bob, bob, carol];
    for (const [i, c] of mc.slice(0, 5).entries()) {
      const got = membershipItems(c.items);
      assert.deepEqual(ofStream(got, `channel:${ch}`), expectedChanges[i], `session ${i}: the channel's membership entries`);
      assert.deepEqual(ofStream(got, 'inbox'), [inboxAdded(owners[i])], `session ${i}: its own addition in its inbox`);
      assert.equal(got.length, expectedChanges[i].length + 1, `session ${i}: no other membership change`);
    }
    assert.deepEqual(mc[5].items, [], 'a non-member gets no membership change');
    for (const p of personal) assert.deepEqual(p.items, [], 'no personal events for group messages');

    const h = await history(server, server.token(carol), `/api/channels/${ch}/messages`);
    assert.deepEqual(h, { messages: [e3, e2, e1], nextBefore: null });
  });

  it('the creator is a member even when not listed; a channel with no other member works', async () => {
    const alice = uid('alice');
    const a = await server.session(alice);
    const ev = collect(a, 'GROUP_MESSAGE_RECEIVE');
    const ch = await createChannel(server, server.token(alice), { id: uid('chan'), members: [] });
    const ack = assertOkAck(await send(a, { channelId: ch, content: 'alone' }));
    // Position 1 is the creator's own addition.
    assert.deepEqual(await ev.waitFor(1), [channelAt(groupEvent(ack, ch, alice, 'alone'), 2)]);
    // Listing oneself is harmless.
    const ch2 = await createChannel(server, server.token(alice), { id: uid('chan'), members: [alice] });
    const ack2 = assertOkAck(await send(a, { channelId: ch2, content: 'me too' }));
    // The creator listed among the members is added once: the message is at 2.
    assert.deepEqual(await ev.waitFor(2), [channelAt(groupEvent(ack, ch, alice, 'alone'), 2), channelAt(groupEvent(ack2, ch2, alice, 'me too'), 2)]);
    await sleep(QUIET_MS);
    assert.equal(ev.items.length, 2, 'listing the creator among members does not double delivery');
  });

  it('members connecting after creation receive the channel too', async () => {
    const [alice, bob] = users('alice', 'bob');
    const ch = await createChannel(server, server.token(alice), { id: uid('chan'), members: [bob] });
    const [a, b] = await server.sessions(alice, bob);
    const eb = collect(b, 'GROUP_MESSAGE_RECEIVE');
    const ack = assertOkAck(await send(a, { channelId: ch, content: 'later' }));
    assert.deepEqual(await eb.waitFor(1), [channelAt(groupEvent(ack, ch, alice, 'later'), 3)]);
  });

  it('refuses a non-member\'s send with not_member; nothing delivered or stored', async () => {
    const [alice, bob, eve] = users('alice', 'bob', 'eve');
    const [a, b, e] = await server.sessions(alice, bob, eve);
    const ch = await createChannel(server, server.token(alice), { id: uid('chan'), members: [bob] });
    const ea = collect(a, 'GROUP_MESSAGE_RECEIVE');
    const ebv = collect(b, 'GROUP_MESSAGE_RECEIVE');
    const eev = collect(e, 'GROUP_MESSAGE_RECEIVE');

    assertErrAck(await send(e, { channelId: ch, content: 'let me in' }), 'not_member');
    assertErrAck(await send(e, { channelId: ch, content: 'with id', clientMsgId: 'nm-1' }), 'not_member');
    // A channel that does not exist: the sender is not a member of it either.
    assertErrAck(await send(e, { channelId: uid('nochan'), content: 'anyone?' }), 'not_member');

    // The clientMsgId of a refused send was not consumed: using it for a
    // valid send later creates (and delivers, and stores) a new message.
    const eme = collect(e, 'MESSAGE_RECEIVE');
    const own = assertOkAck(await send(e, { to: eve, content: 'self', clientMsgId: 'nm-1' }));
    assert.deepEqual(await eme.waitFor(1), [{ id: own.id, senderId: eve, receiverId: eve, content: 'self', createdAt: own.createdAt, clientMsgId: 'nm-1', stream: 'inbox', seq: 1 }]);
    const sentinel = assertOkAck(await send(a, { channelId: ch, content: 'sentinel' }));
    const se = channelAt(groupEvent(sentinel, ch, alice, 'sentinel'), 3);
    await ea.waitFor(1);
    await ebv.waitFor(1);
    await sleep(QUIET_MS);
    assert.deepEqual(ea.items, [se]);
    assert.deepEqual(ebv.items, [se]);
    assert.deepEqual(eev.items, []);
    const h = await history(server, server.token(alice), `/api/channels/${ch}/messages`);
    assert.deepEqual(h, { messages: [se], nextBefore: null });
    // The non-member cannot read the history either.
    const r = await server.api('GET', `/api/channels/${ch}/messages`, { token: server.token(eve) });
    assertHttpError(r, 403, 'non-member history');
  });

  it('a group event reaches a client only after the message is stored', async () => {
    const [alice, bob] = users('alice', 'bob');
    const [a, b] = await server.sessions(alice, bob);
    const ch = await createChannel(server, server.token(alice), { id: uid('chan'), members: [bob] });
    const checks = [];
    b.on('GROUP_MESSAGE_RECEIVE', (e) => {
      checks.push(history(server, server.token(bob), `/api/channels/${ch}/messages`, { limit: '200' })
        .then((h) => ({ id: e.id, stored: h.messages.some((m) => m.id === e.id) })));
    });
    const gb = collect(b, 'GROUP_MESSAGE_RECEIVE');
    const acks = await Promise.all(Array.from({ length: 20 }, (_, i) => send(a, { channelId: ch, content: `s${i}` })));
    acks.forEach((x) => assertOkAck(x));
    await gb.waitFor(20);
    gb.items.forEach((x, i) => assert.equal(x.seq, 3 + i, `event ${i}: seq ${x.seq} (entries 1-2 are the creation's)`));
    const results = await Promise.all(checks);
    for (const r of results) assert.equal(r.stored, true, `message ${r.id} was in history when its event arrived`);
  });

  it('an API request body over the limit is refused with 413 and a JSON error', async () => {
    const alice = uid('alice');
    const r = await server.api('POST', '/api/channels', {
      token: server.token(alice),
      // 1000 valid members of 64 characters: about 67 KB of JSON, over the
      // default 64 KiB body limit (and not over the member limit).
      body: { id: uid('chan'), name: 'n', members: Array.from({ length: 1000 }, (_, i) => `m${String(i).padStart(4, '0')}`.padEnd(64, 'x')) },
    });
    assertHttpError(r, 413, 'oversized body');
  });

  it('multi-tab in a channel: closing tabs never stops delivery to the remaining sessions of any member', async () => {
    const [alice, bob, carol] = users('alice', 'bob', 'carol');
    const [a, b1, b2, c] = await server.sessions(alice, bob, bob, carol);
    const ch = await createChannel(server, server.token(alice), { id: uid('chan'), members: [bob, carol] });
    const gb1 = collect(b1, 'GROUP_MESSAGE_RECEIVE');
    const gb2 = collect(b2, 'GROUP_MESSAGE_RECEIVE');
    const gc = collect(c, 'GROUP_MESSAGE_RECEIVE');
    const m1 = channelAt(groupEvent(assertOkAck(await send(a, { channelId: ch, content: 'm1' })), ch, alice, 'm1'), 4);
    await gb1.waitFor(1);
    await closeAndSettle(server, b1);
    const m2 = channelAt(groupEvent(assertOkAck(await send(a, { channelId: ch, content: 'm2' })), ch, alice, 'm2'), 5);
    assert.deepEqual(await gb2.waitFor(2), [m1, m2], 'bob\'s remaining tab still receives');
    await closeAndSettle(server, b2);
    // Bob has no session left; carol (same gateway, same channel) still receives.
    const m3 = channelAt(groupEvent(assertOkAck(await send(a, { channelId: ch, content: 'm3' })), ch, alice, 'm3'), 6);
    assert.deepEqual(await gc.waitFor(3), [m1, m2, m3]);
    await sleep(QUIET_MS);
    assert.deepEqual(gb1.items, [m1]);
    assert.deepEqual(gb2.items, [m1, m2]);
    // Bob reconnects: receives again.
    const b3 = await server.session(bob);
    const gb3 = collect(b3, 'GROUP_MESSAGE_RECEIVE');
    const m4 = channelAt(groupEvent(assertOkAck(await send(c, { channelId: ch, content: 'm4' })), ch, carol, 'm4'), 7);
    assert.deepEqual(await gb3.waitFor(1), [m4]);
    assert.deepEqual((await history(server, server.token(bob), `/api/channels/${ch}/messages`)).messages, [m4, m3, m2, m1]);
  });
});
