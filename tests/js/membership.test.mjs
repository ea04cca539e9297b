// Live membership changes: a member added with POST .../members (204)
// receives, on its live sessions and without reconnecting, every message
// sent after the 204; a member removed with DELETE (204) receives nothing
// sent after it. Who may add and remove.

import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, uid, users, collect, send, assertOkAck, assertErrAck, groupEvent, history,
  createChannel, assertHttpError, QUIET_MS, sleep, channelAt, membershipEvent, membershipItems, assertSeqRun,
} from './harness.mjs';

/** A session's items of one stream, in arrival order. */
const ofStream = (items, stream) => items.filter((x) => x.stream === stream);

/**
 * Asserts a session's MEMBERSHIP_CHANGE events are exactly `channel` on the
 * channel's stream and `inbox` on its inbox, each in order (the two streams
 * may interleave).
 */
function assertChanges(collector, ch, { channel = [], inbox = [] }, what) {
  const got = membershipItems(collector.items);
  assert.deepEqual(ofStream(got, `channel:${ch}`), channel, `${what}: the channel's membership entries`);
  assert.deepEqual(ofStream(got, 'inbox'), inbox, `${what}: membership entries in its inbox`);
  assert.equal(got.length, channel.length + inbox.length, `${what}: no other membership change: ${JSON.stringify(got)}`);
}

describe('membership changes', () => {
  let server;
  before(async () => {
    server = await startServer({
      env: { FANOUT_LIMITS__MESSAGES_PER_SECOND: '10000', FANOUT_LIMITS__MESSAGE_BURST: '10000', FANOUT_LIMITS__SEND_QUEUE: '10000' },
    });
  });
  after(async () => { await server?.stop(); });

  const addMember = (token, ch, userId) => server.api('POST', `/api/channels/${ch}/members`, { token, body: { userId } });
  const removeMember = (token, ch, userId) => server.api('DELETE', `/api/channels/${ch}/members/${userId}`, { token });

  it('an added member\'s live sessions receive messages sent right after the 204, without reconnecting', async () => {
    const [alice, bob] = users('alice', 'bob');
    const [a, b1] = await server.sessions(alice, bob);
    const b2 = await server.session(bob, { transports: ['polling'] });
    const [ma, mb1, mb2] = [a, b1, b2].map((s) => collect(s, 'MEMBERSHIP_CHANGE'));
    const ch = await createChannel(server, server.token(alice), { id: uid('chan') });
    const ga = collect(a, 'GROUP_MESSAGE_RECEIVE');
    const gb1 = collect(b1, 'GROUP_MESSAGE_RECEIVE');
    const gb2 = collect(b2, 'GROUP_MESSAGE_RECEIVE');

    const r = await addMember(server.token(alice), ch, bob);
    assert.equal(r.status, 204, JSON.stringify(r.body));
    assert.equal(r.body, '', '204 has no body');
    const ack = assertOkAck(await send(a, { channelId: ch, content: 'welcome' }));
    // Channel entries: 1 alice (creation), 2 bob (added); then the messages.
    const e = channelAt(groupEvent(ack, ch, alice, 'welcome'), 3);
    assert.deepEqual((await gb1.waitFor(1)).at(-1), e);
    assert.deepEqual((await gb2.waitFor(1)).at(-1), e);
    // The new member can send at once too, and reads the history.
    const back = assertOkAck(await send(b2, { channelId: ch, content: 'thanks' }));
    const e2 = channelAt(groupEvent(back, ch, bob, 'thanks'), 4);
    await ga.waitFor(2);
    await gb1.waitFor(2);
    await sleep(QUIET_MS);
    assert.deepEqual(ga.items, [e, e2]);
    assert.deepEqual(gb1.items, [e, e2], 'each message once per session');
    assert.deepEqual(gb2.items, [e, e2]);
    const h = await history(server, server.token(bob), `/api/channels/${ch}/messages`);
    assert.deepEqual(h.messages, [e2, e]);
    // Adding an existing member again is harmless: still one delivery.
    const again = await addMember(server.token(alice), ch, bob);
    assert.equal(again.status, 204);
    const ack3 = assertOkAck(await send(a, { channelId: ch, content: 'once' }));
    await gb1.waitFor(3);
    await gb2.waitFor(3);
    await ga.waitFor(3);
    await sleep(QUIET_MS);
    // Adding an existing member writes nothing: the next message is at 5.
    const e3 = channelAt(groupEvent(ack3, ch, alice, 'once'), 5);
    assert.deepEqual(gb1.items, [e, e2, e3]);
    assert.deepEqual(gb2.items, [e, e2, e3]);
    assert.deepEqual(ga.items, [e, e2, e3]);
    // The membership changes: the creator's sessions see the creation and
    // the addition; the added member's sessions see the channel from the
    // entry that added bob, and that addition in bob's inbox; the second
    // add shows nowhere.
    const added = (seq, userId, stream) => membershipEvent({ stream, seq, channelId: ch, userId, change: 'added', byUserId: alice });
    assertChanges(ma, ch, { channel: [added(1, alice), added(2, bob)], inbox: [added(1, alice, 'inbox')] }, 'alice');
    assertChanges(mb1, ch, { channel: [added(2, bob)], inbox: [added(1, bob, 'inbox')] }, 'bob (websocket)');
    assertChanges(mb2, ch, { channel: [added(2, bob)], inbox: [added(1, bob, 'inbox')] }, 'bob (polling)');
  });

  /** How many sends Carol makes after a membership change's 204. */
  const AFTER_CHANGE = 40;

  /**
   * Carol sends into `ch`, paced by `pace(i)`, while `change` (a REST call
   * that must answer 204) runs 30 ms in; she stops AFTER_CHANGE sends after
   * its answer. Every send is acked. Returns the acks and the index of the
   * first send emitted after the 204 (more than 0: some went before).
   */
  async function sendAcross(c, ch, change, pace) {
    const acks = [];
    let changedAt = -1;
    const changing = (async () => {
      await sleep(30);
      const r = await change();
      assert.equal(r.status, 204);
      changedAt = acks.length; // every send emitted from here on is after the 204
    })();
    for (let i = 0; (changedAt < 0 || i < changedAt + AFTER_CHANGE) && i < 5000; i++) {
      acks.push(send(c, { channelId: ch, content: `c${i}` }, 15_000));
      const paused = pace(i);
      if (paused) await paused;
    }
    await changing;
    const done = await Promise.all(acks);
    done.forEach((x, i) => assertOkAck(x, `ack ${i}`));
    assert.ok(changedAt > 0, 'some sends happened before the 204');
    return { done, changedAt };
  }

  /**
   * Carol sends steadily into a channel while alice adds bob; carol goes on
   * for AFTER_CHANGE more sends once the 204 is in. Returns carol's acks (in
   * emission order), the index of the first send emitted after the 204,
   * and the events bob's session received.
   */
  async function addDuringTraffic() {
    const [alice, bob, carol] = users('alice', 'bob', 'carol');
    const [a, b, c] = await server.sessions(alice, bob, carol);
    const ch = await createChannel(server, server.token(alice), { id: uid('chan'), members: [carol] });
    const ga = collect(a, 'GROUP_MESSAGE_RECEIVE');
    const gb = collect(b, 'GROUP_MESSAGE_RECEIVE');
    const mb = collect(b, 'MEMBERSHIP_CHANGE');
    // A few sends per millisecond keep the worker busy with a backlog that
    // straddles the membership's start.
    const { done, changedAt: addedAt } = await sendAcross(
      c, ch, () => addMember(server.token(alice), ch, bob), (i) => (i % 4 === 3 ? sleep(1) : undefined));
    await ga.waitFor(done.length, 15_000);
    await gb.waitUntil((x) => x.id === done.at(-1).id, 15_000).catch(() => {});
    await sleep(QUIET_MS);
    for (const s of [a, b, c]) s.close();
    return { done, addedAt, got: gb.items, changes: membershipItems(mb.items), ch, alice, bob };
  }

  const ROUNDS = 6;
  const rounds = [];

  it('no message sent after the add\'s 204 is missed while another member keeps sending', async () => {
    for (let r = 0; r < ROUNDS; r++) {
      const { done, addedAt, got, changes, ch, alice, bob } = await addDuringTraffic();
      rounds.push({ done, addedAt, got });
      // Bob's addition is one entry of the channel (after 1 alice and 2
      // carol, among carol's messages) and entry 1 of his inbox; his session
      // gets the channel from that entry on, gap-free.
      const mine = ofStream(changes, `channel:${ch}`);
      assert.equal(mine.length, 1, `round ${r}: bob's addition, once: ${JSON.stringify(changes)}`);
      const p = mine[0].seq;
      assert.ok(Number.isInteger(p) && p >= 3, `round ${r}: bob's addition at ${p}`);
      assert.deepEqual(mine, [membershipEvent({ seq: p, channelId: ch, userId: bob, change: 'added', byUserId: alice })]);
      assert.deepEqual(ofStream(changes, 'inbox'), [membershipEvent({ stream: 'inbox', seq: 1, channelId: ch, userId: bob, change: 'added', byUserId: alice })]);
      assertSeqRun(got, `channel:${ch}`, p + 1, `round ${r}: bob's channel messages`);
      const ids = got.map((x) => x.id);
      assert.equal(new Set(ids).size, ids.length, `round ${r}: no message twice`);
      const missing = done.slice(addedAt).map((x) => x.id).filter((id) => !ids.includes(id));
      assert.deepEqual(missing, [], `round ${r}: bob misses nothing sent after the 204`);
      assert.ok(ids.every((id) => done.some((x) => x.id === id)), `round ${r}: bob only gets carol's messages`);
    }
  });

  it('a member added during traffic receives the channel in carol\'s order (also what it gets from before the 204)', async () => {
    assert.equal(rounds.length, ROUNDS, 'the previous test ran');
    for (const [r, { done, addedAt, got }] of rounds.entries()) {
      const order = done.map((x) => x.id);
      const positions = got.map((x) => order.indexOf(x.id));
      assert.deepEqual(positions, [...positions].sort((x, y) => x - y),
        `round ${r}: bob's session got carol's messages out of order (index of the first send after the 204: ${addedAt})`);
    }
  });

  it('a removed member\'s sessions receive nothing sent after the 204', async () => {
    const [alice, bob, carol] = users('alice', 'bob', 'carol');
    const [a, b1, b2, c] = await server.sessions(alice, bob, bob, carol);
    const [ma, mb1, mb2, mc] = [a, b1, b2, c].map((s) => collect(s, 'MEMBERSHIP_CHANGE'));
    // Channel entries 1 alice, 2 bob, 3 carol; the first message is 4.
    const ch = await createChannel(server, server.token(alice), { id: uid('chan'), members: [bob, carol] });
    const ga = collect(a, 'GROUP_MESSAGE_RECEIVE');
    const gb1 = collect(b1, 'GROUP_MESSAGE_RECEIVE');
    const gb2 = collect(b2, 'GROUP_MESSAGE_RECEIVE');
    const gc = collect(c, 'GROUP_MESSAGE_RECEIVE');
    const ack1 = assertOkAck(await send(a, { channelId: ch, content: 'before' }));
    const e1 = channelAt(groupEvent(ack1, ch, alice, 'before'), 4);
    await gb1.waitFor(1);
    await gb2.waitFor(1);

    const r = await removeMember(server.token(alice), ch, bob);
    assert.equal(r.status, 204, JSON.stringify(r.body));
    const ack2 = assertOkAck(await send(a, { channelId: ch, content: 'after' }));
    const ack3 = assertOkAck(await send(c, { channelId: ch, content: 'after 2' }));
    // The removal is entry 5.
    const e2 = channelAt(groupEvent(ack2, ch, alice, 'after'), 6);
    const e3 = channelAt(groupEvent(ack3, ch, carol, 'after 2'), 7);
    await ga.waitFor(3);
    await gc.waitFor(3);
    await sleep(QUIET_MS);
    assert.deepEqual(ga.items, [e1, e2, e3]);
    assert.deepEqual(gc.items, [e1, e2, e3]);
    assert.deepEqual(gb1.items, [e1], 'nothing after the removal');
    assert.deepEqual(gb2.items, [e1], 'nothing after the removal');
    // Bob's sessions get his removal as the channel's last entry, and in his
    // inbox; the others see it on the channel only.
    const change = (seq, userId, kind, stream) => membershipEvent({ stream, seq, channelId: ch, userId, change: kind, byUserId: alice });
    const bobChanges = {
      channel: [change(2, bob, 'added'), change(3, carol, 'added'), change(5, bob, 'removed')],
      inbox: [change(1, bob, 'added', 'inbox'), change(2, bob, 'removed', 'inbox')],
    };
    assertChanges(mb1, ch, bobChanges, 'bob 1');
    assertChanges(mb2, ch, bobChanges, 'bob 2');
    assertChanges(ma, ch, {
      channel: [change(1, alice, 'added'), change(2, bob, 'added'), change(3, carol, 'added'), change(5, bob, 'removed')],
      inbox: [change(1, alice, 'added', 'inbox')],
    }, 'alice');
    assertChanges(mc, ch, {
      channel: [change(3, carol, 'added'), change(5, bob, 'removed')],
      inbox: [change(1, carol, 'added', 'inbox')],
    }, 'carol');
    // The removed member can no longer send nor read.
    assertErrAck(await send(b1, { channelId: ch, content: 'still here?' }), 'not_member');
    assertHttpError(await server.api('GET', `/api/channels/${ch}/messages`, { token: server.token(bob) }), 403, 'removed member history');
    // A session bob opens now does not get the channel either.
    const b3 = await server.session(bob);
    const gb3 = collect(b3, 'GROUP_MESSAGE_RECEIVE');
    const mb3 = collect(b3, 'MEMBERSHIP_CHANGE');
    const ack4 = assertOkAck(await send(a, { channelId: ch, content: 'later' }));
    await gc.waitFor(4);
    await sleep(QUIET_MS);
    assert.deepEqual(gb3.items, []);
    assert.deepEqual(mb3.items, []);
    assert.deepEqual(gb1.items, [e1]);
    assertChanges(mb1, ch, bobChanges, 'bob 1, later');
    // Channel history lists messages only: positions 4, 6, 7, 8.
    assert.deepEqual((await history(server, server.token(carol), `/api/channels/${ch}/messages`)).messages,
      [channelAt(groupEvent(ack4, ch, alice, 'later'), 8), e3, e2, e1]);
  });

  it('nothing sent after the remove\'s 204 reaches the removed member while another member keeps sending', async () => {
    const [alice, bob, carol] = users('alice', 'bob', 'carol');
    const [a, b, c] = await server.sessions(alice, bob, carol);
    const ch = await createChannel(server, server.token(alice), { id: uid('chan'), members: [bob, carol] });
    const ga = collect(a, 'GROUP_MESSAGE_RECEIVE');
    const gb = collect(b, 'GROUP_MESSAGE_RECEIVE');
    const mb = collect(b, 'MEMBERSHIP_CHANGE');
    // The removal is written at the gateway, at the channel's head: carol's
    // sends still in flight then take positions after it. It waits for one
    // of them to be stored (alice has it), so bob has something before it.
    const { done, changedAt: removedAt } = await sendAcross(
      c, ch, async () => { await ga.waitFor(1, 15_000); return removeMember(server.token(alice), ch, bob); }, () => sleep(1));
    assert.equal(done.length - removedAt, AFTER_CHANGE);
    await ga.waitFor(done.length, 15_000);
    // Bob got the messages before the removal on the same path (sentinel).
    assert.ok(gb.items.length > 0, 'bob received messages before the removal');
    await sleep(QUIET_MS);
    const afterIds = new Set(done.slice(removedAt).map((x) => x.id));
    const leaked = gb.items.filter((x) => afterIds.has(x.id)).map((x) => x.content);
    assert.deepEqual(leaked, [], 'the removed member gets nothing sent after the 204');
    // Bob gets the channel gap-free up to his removal, which is its last
    // entry for him: every message stored before it (from 4, after the
    // creation's 1-3), none after.
    const removal = ofStream(membershipItems(mb.items), `channel:${ch}`).filter((x) => x.change === 'removed');
    assert.equal(removal.length, 1, `bob's removal, once: ${JSON.stringify(mb.items)}`);
    const p = removal[0].seq;
    assert.deepEqual(removal, [membershipEvent({ seq: p, channelId: ch, userId: bob, change: 'removed', byUserId: alice })]);
    assertSeqRun(gb.items, `channel:${ch}`, 4, 'bob\'s channel messages');
    assert.equal(gb.items.length, p - 4, `bob got every message before his removal at ${p}, and none after`);
  });

  it('removed, then added again: the live session receives the channel again', async () => {
    const [alice, bob] = users('alice', 'bob');
    const [a, b] = await server.sessions(alice, bob);
    const [ma, mb] = [a, b].map((s) => collect(s, 'MEMBERSHIP_CHANGE'));
    // Channel entries: 1 alice, 2 bob, 3 m1, 4 bob removed, 5 m2, 6 bob
    // added, 7 m3.
    const ch = await createChannel(server, server.token(alice), { id: uid('chan'), members: [bob] });
    const ga = collect(a, 'GROUP_MESSAGE_RECEIVE');
    const gb = collect(b, 'GROUP_MESSAGE_RECEIVE');
    const m1 = channelAt(groupEvent(assertOkAck(await send(a, { channelId: ch, content: 'm1' })), ch, alice, 'm1'), 3);
    await gb.waitFor(1);
    assert.equal((await removeMember(server.token(alice), ch, bob)).status, 204);
    const m2 = channelAt(groupEvent(assertOkAck(await send(a, { channelId: ch, content: 'm2' })), ch, alice, 'm2'), 5);
    await ga.waitFor(2);
    assert.equal((await addMember(server.token(alice), ch, bob)).status, 204);
    const m3 = channelAt(groupEvent(assertOkAck(await send(a, { channelId: ch, content: 'm3' })), ch, alice, 'm3'), 7);
    await ga.waitFor(3);
    await gb.waitUntil((x) => x.id === m3.id);
    await sleep(QUIET_MS);
    assert.deepEqual(gb.items, [m1, m3], 'nothing from while bob was out, everything after he is back');
    assert.deepEqual(ga.items, [m1, m2, m3]);
    const change = (seq, userId, kind, stream) => membershipEvent({ stream, seq, channelId: ch, userId, change: kind, byUserId: alice });
    assertChanges(mb, ch, {
      channel: [change(2, bob, 'added'), change(4, bob, 'removed'), change(6, bob, 'added')],
      inbox: [change(1, bob, 'added', 'inbox'), change(2, bob, 'removed', 'inbox'), change(3, bob, 'added', 'inbox')],
    }, 'bob');
    assertChanges(ma, ch, {
      channel: [change(1, alice, 'added'), change(2, bob, 'added'), change(4, bob, 'removed'), change(6, bob, 'added')],
      inbox: [change(1, alice, 'added', 'inbox')],
    }, 'alice');
  });

  it('permissions: a member adds; the creator removes anyone; a member removes themself; others get 403', async () => {
    const alice = uid('alice'); // creator
    const bob = uid('bob'); // member
    const carol = uid('carol'); // member
    const dave = uid('dave'); // not a member
    const erin = uid('erin');
    const ch = await createChannel(server, server.token(alice), { id: uid('chan'), members: [bob, carol] });
    // Channel entries 1 alice, 2 bob, 3 carol. Carol connects after the
    // creation without resume: live entries only, from here on.
    const c = await server.session(carol);
    const gc = collect(c, 'GROUP_MESSAGE_RECEIVE');
    const mc = collect(c, 'MEMBERSHIP_CHANGE');

    // A non-member cannot add anyone, not even themself.
    assertHttpError(await addMember(server.token(dave), ch, dave), 403, 'non-member adds themself');
    assertHttpError(await addMember(server.token(dave), ch, erin), 403, 'non-member adds another');
    // A member (not the creator) can add.
    const added = await addMember(server.token(bob), ch, erin);
    assert.equal(added.status, 204, JSON.stringify(added.body));
    await history(server, server.token(erin), `/api/channels/${ch}/messages`);

    // A member who is not the creator cannot remove someone else.
    assertHttpError(await removeMember(server.token(bob), ch, carol), 403, 'member removes another');
    // A non-member cannot remove anyone, nor "themself".
    assertHttpError(await removeMember(server.token(dave), ch, carol), 403, 'non-member removes a member');
    assertHttpError(await removeMember(server.token(dave), ch, dave), 403, 'non-member removes themself');
    // Carol is still a member and still receives.
    const ack = assertOkAck(await send(c, { channelId: ch, content: 'still in' }));
    // Entry 4 is erin's addition (by bob).
    assert.deepEqual(await gc.waitFor(1), [channelAt(groupEvent(ack, ch, carol, 'still in'), 5)]);

    // A member removes themself.
    const self = await removeMember(server.token(carol), ch, carol);
    assert.equal(self.status, 204, JSON.stringify(self.body));
    assertHttpError(await server.api('GET', `/api/channels/${ch}/messages`, { token: server.token(carol) }), 403, 'after leaving');
    // The creator removes anyone.
    const byCreator = await removeMember(server.token(alice), ch, erin);
    assert.equal(byCreator.status, 204, JSON.stringify(byCreator.body));
    assertHttpError(await server.api('GET', `/api/channels/${ch}/messages`, { token: server.token(erin) }), 403, 'after removal');
    // Bob is still a member.
    await history(server, server.token(bob), `/api/channels/${ch}/messages`);
    // Carol's session saw erin's addition, then her own leaving (channel
    // entry 6, the last of the channel for her; entry 2 of her inbox, after
    // her addition at 1), and not erin's removal (entry 7).
    await mc.waitFor(3);
    const pc = collect(c, 'MESSAGE_RECEIVE');
    const sentinel = assertOkAck(await send(c, { to: carol, content: 'sentinel' }));
    await pc.waitUntil((x) => x.id === sentinel.id);
    await sleep(QUIET_MS);
    assertChanges(mc, ch, {
      channel: [
        membershipEvent({ seq: 4, channelId: ch, userId: erin, change: 'added', byUserId: bob }),
        membershipEvent({ seq: 6, channelId: ch, userId: carol, change: 'removed', byUserId: carol }),
      ],
      inbox: [membershipEvent({ stream: 'inbox', seq: 2, channelId: ch, userId: carol, change: 'removed', byUserId: carol })],
    }, 'carol');
  });

  it('member routes answer 404 for an unknown channel, 400 for invalid ids, 401 without a token', async () => {
    const [alice, nochan] = users('alice', 'nochan');
    assertHttpError(await addMember(server.token(alice), nochan, uid()), 404, 'add to unknown channel');
    assertHttpError(await removeMember(server.token(alice), nochan, alice), 404, 'remove from unknown channel');
    assertHttpError(await server.api('GET', `/api/channels/${nochan}/messages`, { token: server.token(alice) }), 404, 'history of unknown channel');
    const ch = await createChannel(server, server.token(alice), { id: uid('chan') });
    assertHttpError(await addMember(server.token(alice), ch, 'a:b'), 400, 'invalid userId');
    assertHttpError(await addMember(server.token(alice), ch, 'x'.repeat(65)), 400, 'userId of 65');
    assertHttpError(await server.api('POST', `/api/channels/${ch}/members`, { token: server.token(alice), body: { userId: 5 } }), 400, 'numeric userId');
    assertHttpError(await server.api('POST', `/api/channels/${ch}/members`, { token: server.token(alice), body: {} }), 400, 'no userId');
    assertHttpError(await server.api('POST', `/api/channels/${ch}/members`, { token: server.token(alice), body: 'not json' }), 400, 'not JSON');
    assertHttpError(await server.api('POST', `/api/channels/${ch}/members`, { body: { userId: alice } }), 401, 'no token');
    assertHttpError(await server.api('DELETE', `/api/channels/${ch}/members/${alice}`, {}), 401, 'no token');
  });
});
