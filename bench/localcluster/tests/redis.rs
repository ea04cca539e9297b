//! An owned cluster's life, as the benchmark uses it: started, measured,
//! stopped (or dropped) with nothing left running and its ports free for
//! the next run.

use std::path::Path;
use std::time::Duration;

use fanout_localcluster::redis::RedisCluster;
use fanout_localcluster::ClusterError;

/// `None` (after a loud line) when `redis-server` is not installed, unless
/// `FANOUT_TEST_REQUIRE_SERVICES` says every service must be there.
async fn start() -> Option<RedisCluster> {
    match RedisCluster::start().await {
        Ok(cluster) => Some(cluster),
        Err(ClusterError::Missing(why))
            if !std::env::var("FANOUT_TEST_REQUIRE_SERVICES")
                .is_ok_and(|v| v == "1" || v == "true") =>
        {
            eprintln!("\n*** SKIPPED: Redis Cluster unavailable ({why}) ***\n");
            None
        }
        Err(why) => panic!("could not start a Redis Cluster: {why}"),
    }
}

fn running(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Nodes may take a moment to let go of their ports after they are reaped.
async fn eventually_free(ports: &[u16]) -> bool {
    for _ in 0..100 {
        if ports.iter().all(|&p| free(p) && free(p + 10_000)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn stop_and_drop_leave_nothing_running() {
    let Some(cluster) = start().await else {
        return;
    };
    let pids = cluster.node_pids();
    let ports = cluster.ports();
    assert_eq!(pids.len(), 6, "{pids:?}");
    assert!(pids.iter().all(|&(_, pid)| running(pid)), "{pids:?}");
    assert_eq!(
        cluster.primaries().await.expect("primaries"),
        ports[..3].to_vec()
    );
    assert_eq!(
        cluster.seeds.split(',').count(),
        3,
        "seeds {}",
        cluster.seeds
    );
    cluster.stop().await;
    assert!(!pids.iter().any(|&(_, pid)| running(pid)), "{pids:?}");
    assert!(eventually_free(&ports).await, "ports {ports:?} still taken");

    let Some(cluster) = start().await else {
        return;
    };
    let pids = cluster.node_pids();
    let ports = cluster.ports();
    let written = cluster.purge("localcluster-test").await.expect("purge");
    assert_eq!(written, 0);
    drop(cluster);
    assert!(!pids.iter().any(|&(_, pid)| running(pid)), "{pids:?}");
    assert!(eventually_free(&ports).await, "ports {ports:?} still taken");
}
