// Configured limits: `limits.max_content_bytes` counts UTF-8 bytes, a
// session sending faster than its rate gets `rate_limited` for the excess,
// which is neither stored nor delivered, and a user's connections to one
// gateway beyond `limits.max_connections_per_user` are refused.

import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, uid, users, collect, send, assertOkAck, assertErrAck, personalEvent, history, inboxAt,
  QUIET_MS, sleep,
} from './harness.mjs';

describe('configured limits', () => {
  let server;
  before(async () => {
    server = await startServer({
      env: {
        FANOUT_LIMITS__MAX_CONTENT_BYTES: '10',
        FANOUT_LIMITS__MESSAGES_PER_SECOND: '1',
        FANOUT_LIMITS__MESSAGE_BURST: '5',
        FANOUT_LIMITS__MAX_CONNECTIONS_PER_USER: '2',
      },
    });
  });
  after(async () => { await server?.stop(); });

  it('max_content_bytes=10: 10 bytes of UTF-8 pass, 11 are too_large', async () => {
    const [alice, bob] = users('alice', 'bob');
    const [a, b] = await server.sessions(alice, bob);
    const eb = collect(b, 'MESSAGE_RECEIVE');
    assertErrAck(await send(a, { to: bob, content: 'éééééx' }), 'too_large', '11 bytes in 6 characters');
    assertErrAck(await send(a, { to: bob, content: 'x'.repeat(11) }), 'too_large', '11 ASCII bytes');
    assertErrAck(await send(a, { to: bob, content: '😀😀😀' }), 'too_large', '12 bytes in 3 characters');
    const ok = assertOkAck(await send(a, { to: bob, content: 'ééééé' }));
    // Refused sends take no position: the accepted one is the first.
    const e = inboxAt(personalEvent(ok, alice, bob, 'ééééé'), 1);
    await eb.waitFor(1);
    await sleep(QUIET_MS);
    assert.deepEqual(eb.items, [e]);
    const h = await history(server, server.token(bob), `/api/conversations/${alice}/messages`);
    assert.deepEqual(h, { messages: [e], nextBefore: null });
  });

  it('max_connections_per_user=2: a third connection to one gateway gets connect_error "too_many_connections"', async () => {
    const user = uid('tabs');
    await server.session(user, { gateway: 0 });
    await server.session(user, { gateway: 0 });
    await assert.rejects(server.session(user, { gateway: 0 }), (e) => {
      assert.equal(e.message, 'too_many_connections');
      return true;
    });
  });

  it('rate_limited: sends beyond the burst are refused, not stored, not delivered; later sends pass again', async () => {
    const [alice, bob] = users('alice', 'bob');
    const [a, b] = await server.sessions(alice, bob);
    const eb = collect(b, 'MESSAGE_RECEIVE');
    const pending = [];
    for (let i = 0; i < 20; i++) pending.push(send(a, { to: bob, content: `r${i}`, clientMsgId: `rl-${i}` }));
    const acks = await Promise.all(pending);
    const accepted = [];
    let refused = 0;
    for (const [i, ack] of acks.entries()) {
      if (ack.ok) {
        assertOkAck(ack, `send ${i}`);
        // Refused sends take no position: the accepted ones are 1, 2, ...
        accepted.push(inboxAt(personalEvent(ack, alice, bob, `r${i}`, `rl-${i}`), accepted.length + 1));
      } else {
        assertErrAck(ack, 'rate_limited', `send ${i}`);
        refused += 1;
      }
    }
    assert.ok(accepted.length >= 5, `the burst of 5 passes (accepted ${accepted.length})`);
    assert.ok(refused >= 10, `most of 20 instant sends are refused (refused ${refused})`);
    await eb.waitFor(accepted.length);
    await sleep(QUIET_MS);
    assert.deepEqual(eb.items, accepted, 'exactly the accepted sends are delivered, in order');
    const h = await history(server, server.token(bob), `/api/conversations/${alice}/messages`);
    assert.deepEqual(h.messages, [...accepted].reverse(), 'exactly the accepted sends are stored');

    // A refused send retried with its clientMsgId once the rate allows is a
    // fresh accept, delivered once.
    const lastRefused = acks.findLastIndex((x) => !x.ok);
    await sleep(1200);
    const retry = assertOkAck(await send(a, { to: bob, content: `r${lastRefused}`, clientMsgId: `rl-${lastRefused}` }));
    const re = inboxAt(personalEvent(retry, alice, bob, `r${lastRefused}`, `rl-${lastRefused}`), accepted.length + 1);
    await eb.waitFor(accepted.length + 1);
    assert.deepEqual(eb.items.at(-1), re);
    assert.ok(!accepted.some((x) => x.id === retry.id));
  });
});
