//! Load limits: the machines' concurrency, the app's wait queue, and client connections per app.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_spread_load_and_a_full_app_queues_then_answers_503() {
    let (_tmp, h) = start().await;
    let h = std::sync::Arc::new(h);

    // Soft limit 1 on two machines: with one busy, the next request goes to
    // the other even though the busy one is far from its hard limit.
    create_app(&h, "spread").await;
    let a = machine(&h, "spread", web(8080, 1, 5)).await;
    let b = machine(&h, "spread", web(8080, 1, 5)).await;
    let slow = tokio::spawn({
        let h = h.clone();
        async move { get(&h, "spread", "/?sleep_ms=600").await }
    });
    until_metric(&h, r#"fly_app_concurrency{app="spread",region="dev"} 1"#).await;
    let quick = get(&h, "spread", "/").await;
    let slow = slow.await.unwrap();
    assert_eq!((slow.status, quick.status), (200, 200));
    assert_ne!(
        slow.machine, quick.machine,
        "the second went to the idle one"
    );
    for m in [&slow.machine, &quick.machine] {
        assert!(*m == Some(a.clone()) || *m == Some(b.clone()));
    }

    // One machine, hard limit 2, both slots taken for 2 s.
    create_app(&h, "full").await;
    machine(&h, "full", web(8080, 1, 2)).await;
    let busy: Vec<_> = (0..2)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move { get(&h, "full", "/?sleep_ms=2000").await })
        })
        .collect();
    until_metric(&h, r#"fly_app_concurrency{app="full",region="dev"} 2"#).await;
    // The third waits in the queue (its only place), the fourth finds the
    // queue full at once, and the third gives up after queue_timeout_ms.
    let queued = tokio::spawn({
        let h = h.clone();
        async move { get(&h, "full", "/").await }
    });
    until_metric(&h, "fly_edge_queued_requests 1").await;
    let rejected = get(&h, "full", "/").await;
    assert_eq!(rejected.status, 503, "{rejected:?}");
    assert_eq!(rejected.code.as_deref(), Some("PR04"));
    assert_eq!(rejected.retry_after.as_deref(), Some("1"));
    assert!(rejected.body.contains("the queue is full"), "{rejected:?}");
    let timed_out = queued.await.unwrap();
    assert_eq!(timed_out.status, 503, "{timed_out:?}");
    assert_eq!(timed_out.code.as_deref(), Some("PR04"));
    assert_eq!(timed_out.retry_after.as_deref(), Some("1"));
    assert!(
        timed_out.body.contains("stayed at its hard limit for 1s"),
        "{timed_out:?}"
    );
    for r in busy {
        assert_eq!(r.await.unwrap().status, 200, "the slow ones finish");
    }

    // A slot that frees while a request waits serves it.
    let busy: Vec<_> = (0..2)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move { get(&h, "full", "/?sleep_ms=200").await })
        })
        .collect();
    until_metric(&h, r#"fly_app_concurrency{app="full",region="dev"} 2"#).await;
    let served = get(&h, "full", "/").await;
    assert_eq!(served.status, 200, "{served:?}");
    for r in busy {
        assert_eq!(r.await.unwrap().status, 200);
    }
    until_metric(&h, "fly_edge_queued_requests 0").await;
}

#[tokio::test]
async fn an_app_gets_at_most_max_conns_per_app_client_connections() {
    let tmp = tempfile::tempdir().unwrap();
    let config = format!("{CONFIG}max_conns_per_app = 2\n");
    let h = Hangar::start_with(&tmp.path().join("data"), Some(&config)).await;
    create_app(&h, "few").await;
    machine(&h, "few", web(8080, 20, 25)).await;

    /// A keep-alive connection that has sent one request; its status.
    async fn open(h: &Hangar) -> (tokio::net::TcpStream, String) {
        let mut tcp = tokio::net::TcpStream::connect(h.addrs.http).await.unwrap();
        tcp.write_all(b"GET /?bytes=2 HTTP/1.1\r\nHost: few.localhost\r\n\r\n")
            .await
            .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            tokio::time::timeout(WAIT, tcp.read_exact(&mut byte))
                .await
                .unwrap()
                .unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        (tcp, head.lines().next().unwrap().to_string())
    }
    let (first, status) = open(&h).await;
    assert!(status.ends_with("200 OK"), "{status}");
    let (_second, status) = open(&h).await;
    assert!(status.ends_with("200 OK"), "{status}");
    let (_third, status) = open(&h).await;
    assert!(status.contains(" 503 "), "{status}");
    // Another app is not affected, and a closed connection frees a place.
    assert_eq!(get(&h, "nope", "/").await.status, 404);
    drop(first);
    eventually("the closed connection's place is freed", || async {
        open(&h).await.1.ends_with("200 OK")
    })
    .await;
    let text = metrics(&h).await;
    assert!(
        text.contains(r#"fly_edge_proxy_errors_count{code="PE04"}"#),
        "{text}"
    );
}
