mod support;

use std::time::Duration;

use support::*;

#[tokio::test]
async fn smoke() -> anyhow::Result<()> {
    let world = World::new("").await?;
    let mut etcd = world.etcd_client().await?;
    etcd.put("/a/1", "one", None).await?;
    let mut service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    if let Err(e) = wait_converged(&world, "kv", b"", Duration::from_secs(10)).await {
        println!("{}", service.log_tail(80));
        return Err(e);
    }
    etcd.put("/a/2", "two", None).await?;
    etcd.delete("/a/1", None).await?;
    wait_converged(&world, "kv", b"", Duration::from_secs(10)).await?;
    let pg = world.pg().await?;
    pg.execute(
        "INSERT INTO kv (key, value) VALUES ('/from/pg', 'hello')",
        &[],
    )
    .await?;
    wait_converged(&world, "kv", b"", Duration::from_secs(10)).await?;
    let got = etcd.get("/from/pg", None).await?;
    assert_eq!(got.kvs()[0].value(), b"hello");
    println!("{}", service.status().await?);
    let code = service.terminate(Duration::from_secs(10)).await?;
    assert!(code.success(), "{code}");
    Ok(())
}
