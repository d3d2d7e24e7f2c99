//! The fault proxy really cuts, black-holes and restores traffic.

use std::time::Duration;

use eps_harness::{Etcd, FaultMode, Postgres, Proxy};

#[tokio::test]
async fn proxy_cuts_blackholes_and_restores_etcd_traffic() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let proxy = Proxy::start(format!("127.0.0.1:{}", etcd.client_port()).parse()?).await?;
    let endpoint = format!("http://127.0.0.1:{}", proxy.port());
    let mut client = etcd_client::Client::connect([endpoint.clone()], None).await?;
    client.put("k", "through the proxy", None).await?;
    assert!(proxy.bytes_forwarded() > 0);

    proxy.set(FaultMode::Cut);
    let cut = tokio::time::timeout(Duration::from_secs(5), client.put("k", "x", None)).await;
    assert!(
        matches!(cut, Ok(Err(_))),
        "a cut connection fails fast: {cut:?}"
    );

    proxy.set(FaultMode::Blackhole);
    let mut fresh = tokio::time::timeout(
        Duration::from_secs(3),
        etcd_client::Client::connect([endpoint.clone()], None),
    )
    .await;
    if let Ok(Ok(c)) = fresh.as_mut() {
        let hung = tokio::time::timeout(Duration::from_millis(500), c.put("k", "y", None)).await;
        assert!(hung.is_err(), "a black hole answers nothing");
    }

    proxy.set(FaultMode::Pass);
    let mut restored = None;
    for _ in 0..50 {
        if let Ok(Ok(mut c)) = tokio::time::timeout(
            Duration::from_secs(2),
            etcd_client::Client::connect([endpoint.clone()], None),
        )
        .await
            && let Ok(response) = c.put("k", "after", None).await
        {
            restored = response.header().map(|h| h.revision());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let revision = restored.expect("traffic flows again after restore");
    // At that revision: the black-holed put, held like a TCP retransmit,
    // may still land after the partition heals.
    let mut direct = etcd.client().await?;
    let at = etcd_client::GetOptions::new().with_revision(revision);
    assert_eq!(direct.get("k", Some(at)).await?.kvs()[0].value(), b"after");
    Ok(())
}

#[tokio::test]
async fn proxy_cuts_postgres_connections() -> anyhow::Result<()> {
    let db = Postgres::fresh_database().await?;
    let proxy = Proxy::start(format!("127.0.0.1:{}", db.port).parse()?).await?;
    let client = eps_harness::postgres::connect(&db.url_via(proxy.port())).await?;
    client.simple_query("SELECT 1").await?;
    proxy.set(FaultMode::Cut);
    let result =
        tokio::time::timeout(Duration::from_secs(5), client.simple_query("SELECT 1")).await;
    assert!(
        matches!(result, Ok(Err(_))),
        "query over a cut connection fails: {result:?}"
    );
    assert!(
        eps_harness::postgres::connect(&db.url_via(proxy.port()))
            .await
            .is_err()
    );
    proxy.set(FaultMode::Pass);
    let client = eps_harness::postgres::connect(&db.url_via(proxy.port())).await?;
    client.simple_query("SELECT 1").await?;
    Ok(())
}
