// History: GET /api/channels/{id}/messages and
// GET /api/conversations/{userId}/messages — newest first, `before`
// exclusive, `nextBefore` paging, limit default 50 and at most 200, items
// shaped like delivered events, members only (403), a token required (401).

import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, uid, collect, send, assertOkAck, personalEvent, groupEvent, history,
  createChannel, assertHttpError, channelAt, inboxAt,
} from './harness.mjs';

describe('history', () => {
  let server;
  let alice; let bob; let carol; let ch;
  let groupEvents; // in send order
  let personalEvents; // in send order
  const G = 205;
  const P = 7;

  before(async () => {
    server = await startServer({
      env: { FANOUT_LIMITS__MESSAGES_PER_SECOND: '10000', FANOUT_LIMITS__MESSAGE_BURST: '10000', FANOUT_LIMITS__SEND_QUEUE: '10000' },
    });
    alice = uid('alice');
    bob = uid('bob');
    carol = uid('carol');
    const [a, b] = await server.sessions(alice, bob);
    ch = await createChannel(server, server.token(alice), { id: uid('chan'), members: [bob] });
    const gb = collect(b, 'GROUP_MESSAGE_RECEIVE');
    const pb = collect(b, 'MESSAGE_RECEIVE');
    const gPayloads = Array.from({ length: G }, (_, i) => (i % 2
      ? { channelId: ch, content: `g${i}`, clientMsgId: `h-${i}` }
      : { channelId: ch, content: `g${i}` }));
    const gAcks = await Promise.all(gPayloads.map((p) => send(a, p, 15_000)));
    // The channel's positions 1 and 2 are the creation's (alice, bob); one
    // session's sends keep their emission order, so message i is at 3 + i.
    groupEvents = gAcks.map((ack, i) => channelAt(groupEvent(assertOkAck(ack), ch, alice, gPayloads[i].content, gPayloads[i].clientMsgId), 3 + i));
    personalEvents = [];
    for (let i = 0; i < P; i++) {
      const from = i % 2 ? b : a;
      const fromId = i % 2 ? bob : alice;
      const toId = i % 2 ? alice : bob;
      const cid = i % 3 === 0 ? `p-${i}` : undefined;
      const payload = { to: toId, content: `p${i}` };
      if (cid) payload.clientMsgId = cid;
      const ack = assertOkAck(await send(from, payload));
      // Both inboxes hold their addition to the channel at 1, then every
      // message of this conversation: the same position in both.
      personalEvents.push(inboxAt(personalEvent(ack, fromId, toId, `p${i}`, cid), 2 + i));
    }
    // Everything was delivered, hence stored.
    await gb.waitFor(G, 15_000);
    await pb.waitFor(P, 15_000);
    assert.deepEqual(gb.items, groupEvents);
    assert.deepEqual(pb.items, personalEvents);
  });
  after(async () => { await server?.stop(); });

  const chPath = () => `/api/channels/${ch}/messages`;
  // History is newest first by id (UUIDv7). Ids from two gateways within
  // one millisecond need not follow the delivery order (which the test
  // checks above), so the expected page is sorted the way history is.
  const newestFirst = (events) => [...events].sort((x, y) => (x.id < y.id ? 1 : x.id > y.id ? -1 : 0));

  it('default limit is 50, newest first, items shaped like the delivered events', async () => {
    const page = await history(server, server.token(bob), chPath());
    assert.equal(page.messages.length, 50);
    assert.deepEqual(page.messages, newestFirst(groupEvents).slice(0, 50));
    assert.equal(page.nextBefore, page.messages.at(-1).id);
  });

  it('limit is at most 200', async () => {
    const page = await history(server, server.token(bob), chPath(), { limit: '200' });
    assert.deepEqual(page.messages, newestFirst(groupEvents).slice(0, 200));
    assert.equal(page.nextBefore, page.messages.at(-1).id);
    const r = await server.api('GET', `${chPath()}?limit=1000`, { token: server.token(bob) });
    if (r.status === 200) {
      assert.ok(r.body.messages.length <= 200, `limit=1000 returned ${r.body.messages.length} messages`);
      assert.deepEqual(r.body.messages, newestFirst(groupEvents).slice(0, r.body.messages.length));
    } else {
      assertHttpError(r, 400, 'limit=1000');
    }
  });

  it('pages with nextBefore through everything, before being exclusive, ending with nextBefore null', async () => {
    const seen = [];
    let before;
    let pages = 0;
    for (;;) {
      const page = await history(server, server.token(alice), chPath(), before ? { limit: '60', before } : { limit: '60' });
      pages += 1;
      assert.ok(page.messages.length <= 60);
      if (before) assert.ok(!page.messages.some((m) => m.id === before), 'before is exclusive');
      seen.push(...page.messages);
      if (page.nextBefore === null) break;
      assert.equal(page.nextBefore, page.messages.at(-1).id);
      before = page.nextBefore;
      assert.ok(pages < 10, 'paging terminates');
    }
    assert.ok(pages >= 4, `${G} messages take at least 4 pages of 60`);
    assert.deepEqual(seen, newestFirst(groupEvents));
  });

  it('before=<id> starts right after that message; the last page has nextBefore null', async () => {
    const k = 10;
    const page = await history(server, server.token(bob), chPath(), { before: groupEvents[k].id, limit: '3' });
    assert.deepEqual(page.messages, [groupEvents[9], groupEvents[8], groupEvents[7]]);
    assert.equal(page.nextBefore, groupEvents[7].id);
    const tail = await history(server, server.token(bob), chPath(), { before: groupEvents[2].id, limit: '3' });
    assert.deepEqual(tail, { messages: [groupEvents[1], groupEvents[0]], nextBefore: null },
      'a page shorter than the limit is the last one');
    const none = await history(server, server.token(bob), chPath(), { before: groupEvents[0].id });
    assert.deepEqual(none, { messages: [], nextBefore: null });
    // Exactly `limit` messages left: either nextBefore is null, or the page
    // it leads to is empty and ends the paging.
    const exact = await history(server, server.token(bob), chPath(), { limit: '200', before: groupEvents[200].id });
    assert.deepEqual(exact.messages, newestFirst(groupEvents.slice(0, 200)));
    if (exact.nextBefore !== null) {
      assert.equal(exact.nextBefore, groupEvents[0].id);
      const end = await history(server, server.token(bob), chPath(), { limit: '200', before: exact.nextBefore });
      assert.deepEqual(end, { messages: [], nextBefore: null });
    }
  });

  it('a channel\'s history is for members only: 403 for others, 401 without a token, 404 for an unknown channel', async () => {
    assertHttpError(await server.api('GET', chPath(), { token: server.token(carol) }), 403, 'non-member');
    assertHttpError(await server.api('GET', chPath(), {}), 401, 'no token');
    assertHttpError(await server.api('GET', chPath(), { token: 'nope' }), 401, 'bad token');
    assertHttpError(await server.api('GET', `/api/channels/${uid('nochan')}/messages`, { token: server.token(bob) }), 404, 'unknown channel');
  });

  it('personal history: both parties see the same conversation, newest first, with paging', async () => {
    const fromAlice = await history(server, server.token(alice), `/api/conversations/${bob}/messages`);
    const fromBob = await history(server, server.token(bob), `/api/conversations/${alice}/messages`);
    assert.deepEqual(fromAlice, { messages: newestFirst(personalEvents), nextBefore: null });
    assert.deepEqual(fromBob, fromAlice);
    const p1 = await history(server, server.token(alice), `/api/conversations/${bob}/messages`, { limit: '3' });
    assert.deepEqual(p1.messages, newestFirst(personalEvents).slice(0, 3));
    assert.equal(p1.nextBefore, p1.messages.at(-1).id);
    const p2 = await history(server, server.token(alice), `/api/conversations/${bob}/messages`, { limit: '3', before: p1.nextBefore });
    assert.deepEqual(p2.messages, newestFirst(personalEvents).slice(3, 6));
    const p3 = await history(server, server.token(alice), `/api/conversations/${bob}/messages`, { limit: '3', before: p2.nextBefore });
    assert.deepEqual(p3, { messages: newestFirst(personalEvents).slice(6), nextBefore: null });
  });

  it('personal history is only the caller\'s own conversation', async () => {
    // Carol asking for "alice" gets carol<->alice, which is empty.
    const h = await history(server, server.token(carol), `/api/conversations/${alice}/messages`);
    assert.deepEqual(h, { messages: [], nextBefore: null });
    // Group messages never show up in personal history, nor personal in the channel's.
    const own = await history(server, server.token(alice), `/api/conversations/${alice}/messages`);
    assert.deepEqual(own, { messages: [], nextBefore: null });
    const chan = await history(server, server.token(alice), chPath(), { limit: '200' });
    assert.ok(chan.messages.every((m) => 'channelId' in m && !('receiverId' in m)));
    assertHttpError(await server.api('GET', `/api/conversations/${alice}/messages`, {}), 401, 'no token');
  });

  it('rejects an invalid before or limit with 400', async () => {
    const t = server.token(bob);
    for (const q of ['before=not-an-id', 'limit=abc', 'limit=-1', 'limit=0']) {
      assertHttpError(await server.api('GET', `${chPath()}?${q}`, { token: t }), 400, q);
      assertHttpError(await server.api('GET', `/api/conversations/${alice}/messages?${q}`, { token: t }), 400, q);
    }
    assertHttpError(await server.api('GET', '/api/conversations/a:b/messages', { token: t }), 400, 'invalid user id');
  });
});
