// Every invalid `sendMessage` gets its code (`invalid_payload`, `too_large`)
// and leaves nothing stored and nothing delivered. `content` is limited in
// UTF-8 bytes (default 4096), not in characters.

import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, uid, collect, send, assertOkAck, assertErrAck, personalEvent, groupEvent,
  history, createChannel, QUIET_MS, sleep, inboxAt, channelAt,
} from './harness.mjs';

describe('sendMessage validation', () => {
  let server;
  let alice; let bob; let a; let b; let ch;
  let ea; let eb; let ga; let gb;
  before(async () => {
    server = await startServer();
    alice = uid('alice');
    bob = uid('bob');
    a = await server.session(alice);
    b = await server.session(bob);
    ch = await createChannel(server, server.token(alice), { id: uid('chan'), members: [bob] });
    ea = collect(a, 'MESSAGE_RECEIVE');
    eb = collect(b, 'MESSAGE_RECEIVE');
    ga = collect(a, 'GROUP_MESSAGE_RECEIVE');
    gb = collect(b, 'GROUP_MESSAGE_RECEIVE');
  });
  after(async () => { await server?.stop(); });

  const e2048 = 'é'.repeat(2048); // 4096 bytes
  const e2049 = 'é'.repeat(2049); // 4098 bytes
  const emoji1024 = '😀'.repeat(1024); // 4096 bytes, 2048 UTF-16 units
  const emoji1025 = '😀'.repeat(1025); // 4100 bytes
  const ascii4097 = 'x'.repeat(4097);

  const invalid = () => [
    ['a string', 'hello'],
    ['a number', 42],
    ['true', true],
    ['null', null],
    ['an array', [{ to: bob, content: 'x' }]],
    ['an empty object', {}],
    ['missing content', { to: bob }],
    ['missing content (channel)', { channelId: ch }],
    ['empty content', { to: bob, content: '' }],
    ['empty content (channel)', { channelId: ch, content: '' }],
    ['numeric content', { to: bob, content: 5 }],
    ['object content', { to: bob, content: { text: 'x' } }],
    ['both to and channelId', { to: bob, channelId: ch, content: 'x' }],
    ['neither to nor channelId', { content: 'x' }],
    ['to with a colon', { to: 'a:b', content: 'x' }],
    ['to of 65 characters', { to: 'a'.repeat(65), content: 'x' }],
    ['empty to', { to: '', content: 'x' }],
    ['numeric to', { to: 5, content: 'x' }],
    ['array to', { to: [bob], content: 'x' }],
    ['to with a space', { to: 'a b', content: 'x' }],
    ['to with a dot', { to: 'a.b', content: 'x' }],
    ['to with a non-ASCII letter', { to: 'bé', content: 'x' }],
    ['channelId with a colon', { channelId: 'a:b', content: 'x' }],
    ['channelId of 65 characters', { channelId: 'c'.repeat(65), content: 'x' }],
    ['empty channelId', { channelId: '', content: 'x' }],
    ['numeric channelId', { channelId: 7, content: 'x' }],
    ['clientMsgId with a space', { to: bob, content: 'x', clientMsgId: 'a b' }],
    ['clientMsgId of 65 characters', { to: bob, content: 'x', clientMsgId: 'k'.repeat(65) }],
    ['empty clientMsgId', { to: bob, content: 'x', clientMsgId: '' }],
    ['numeric clientMsgId', { to: bob, content: 'x', clientMsgId: 12 }],
    ['clientMsgId with a slash', { to: bob, content: 'x', clientMsgId: 'a/b' }],
    ['clientMsgId with a space (channel)', { channelId: ch, content: 'x', clientMsgId: 'a b' }],
    ['clientMsgId of 65 characters (channel)', { channelId: ch, content: 'x', clientMsgId: 'k'.repeat(65) }],
  ];
  const tooLarge = () => [
    ['2049 é (4098 bytes)', { to: bob, content: e2049 }],
    ['1025 emoji (4100 bytes)', { to: bob, content: emoji1025 }],
    ['4097 ASCII bytes', { to: bob, content: ascii4097 }],
    ['2049 é in a channel', { channelId: ch, content: e2049 }],
    ['4097 bytes with a clientMsgId', { to: bob, content: ascii4097, clientMsgId: 'big-1' }],
  ];

  it('answers invalid_payload to every malformed payload', async () => {
    for (const [name, payload] of invalid()) {
      assertErrAck(await send(a, payload), 'invalid_payload', name);
    }
  });

  it('answers invalid_payload to a send with no payload at all', async () => {
    const ack = await a.timeout(5000).emitWithAck('sendMessage');
    assertErrAck(ack, 'invalid_payload', 'no payload');
  });

  it('answers too_large to content over the limit in UTF-8 bytes', async () => {
    for (const [name, payload] of tooLarge()) {
      assertErrAck(await send(a, payload), 'too_large', name);
    }
  });

  it('stored and delivered none of the refused sends; the limit is in bytes, inclusive', async () => {
    // Exactly 4096 bytes of UTF-8 are accepted (2048 characters, or 1024
    // astral characters); delivered on the same paths as the refusals.
    const ok1 = assertOkAck(await send(a, { to: bob, content: e2048 }));
    const ok2 = assertOkAck(await send(a, { to: bob, content: emoji1024, clientMsgId: 'big-1' }));
    const ok3 = assertOkAck(await send(a, { channelId: ch, content: e2048 }));
    // Refusals take no position. Both inboxes hold their addition to the
    // channel at 1; the channel holds the creation's entries 1 (alice) and
    // 2 (bob).
    const p1 = inboxAt(personalEvent(ok1, alice, bob, e2048), 2);
    const p2 = inboxAt(personalEvent(ok2, alice, bob, emoji1024, 'big-1'), 3);
    const g3 = channelAt(groupEvent(ok3, ch, alice, e2048), 3);
    await eb.waitFor(2);
    await ea.waitFor(2);
    await gb.waitFor(1);
    await ga.waitFor(1);
    await sleep(QUIET_MS);
    assert.deepEqual(eb.items, [p1, p2]);
    assert.deepEqual(ea.items, [p1, p2]);
    assert.deepEqual(gb.items, [g3]);
    assert.deepEqual(ga.items, [g3]);
    // The refused "big-1" did not reserve the clientMsgId: ok2 is new.
    assert.notEqual(ok2.id, ok1.id);

    const h = await history(server, server.token(bob), `/api/conversations/${alice}/messages`);
    assert.deepEqual(h, { messages: [p2, p1], nextBefore: null });
    const hc = await history(server, server.token(bob), `/api/channels/${ch}/messages`);
    assert.deepEqual(hc, { messages: [g3], nextBefore: null });
    const hs = await history(server, server.token(alice), `/api/conversations/${alice}/messages`);
    assert.deepEqual(hs, { messages: [], nextBefore: null });
  });

  it('a session keeps working after refusals (the refusals did not close it)', async () => {
    assert.equal(a.connected, true);
    const ack = assertOkAck(await send(a, { to: bob, content: 'still here' }));
    assert.deepEqual((await eb.waitFor(3)).at(-1), inboxAt(personalEvent(ack, alice, bob, 'still here'), 4));
  });
});
