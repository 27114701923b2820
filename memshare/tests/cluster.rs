//! Several nodes in one process on loopback: directory, buffers, atomics, copies,
//! tasks, striped arrays, and every bad-input case, each a typed error.

use std::time::{Duration, Instant};

use pfs_memshare::{Error, FailureDetection, Node, NodeConfig, Rights, Secret, TaskError};

/// Generous: joining and gossip take a few hundred milliseconds on an idle machine.
const JOIN: Duration = Duration::from_secs(20);

fn fast_fd() -> FailureDetection {
    FailureDetection {
        probe_period: Duration::from_millis(300),
        probe_rtt: Duration::from_millis(100),
        suspect_to_down: Duration::from_millis(600),
    }
}

fn config(listen: &str) -> NodeConfig {
    NodeConfig::new(listen)
        .failure_detection(fast_fd())
        .op_timeout(Duration::from_secs(5))
        .task_timeout(Duration::from_secs(10))
}

fn register_tasks(n: &Node) {
    n.register_task("sum", |view, _| {
        let mut s = 0u64;
        view.for_each_u64_chunk(|c| s = c.iter().fold(s, |s, v| s.wrapping_add(*v)))?;
        Ok(s.to_le_bytes().to_vec())
    });
    n.register_task("echo_len", |view, args| {
        let mut out = view.len().to_le_bytes().to_vec();
        out.extend_from_slice(args);
        Ok(out)
    });
    n.register_task("first_bytes", |view, args| {
        let n = u64::from_le_bytes(args.try_into().map_err(|_| "args: one u64")?);
        Ok(view.to_vec(0, n)?)
    });
    n.register_task("panics", |_, _| panic!("deliberate panic in a task"));
    n.register_task("fails", |_, _| Err(TaskError::from("no good")));
    n.register_task("sleeps", |_, args| {
        let ms = u64::from_le_bytes(args.try_into().map_err(|_| "args: one u64")?);
        std::thread::sleep(Duration::from_millis(ms));
        Ok(Vec::new())
    });
}

/// `n` nodes on `scheme` loopback, all joined, tasks registered.
fn cluster(n: usize, scheme: &str, tweak: impl Fn(NodeConfig) -> NodeConfig) -> Vec<Node> {
    let first = Node::start(tweak(config(&format!("{scheme}://127.0.0.1:0")))).unwrap();
    let seed = first.addr().to_string();
    let mut nodes = vec![first];
    for _ in 1..n {
        let c = tweak(config(&format!("{scheme}://127.0.0.1:0")).seed(seed.clone()));
        nodes.push(Node::start(c).unwrap());
    }
    for node in &nodes {
        node.wait_for_members(n - 1, JOIN).unwrap();
        register_tasks(node);
    }
    nodes
}

fn sum_of(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().unwrap())
}

#[test]
fn export_open_read_write_atomics_across_nodes() {
    let nodes = cluster(3, "tcp", |c| c);
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let local = a.export("shared", 4096, Rights::ALL).unwrap();
    assert!(local.is_local());
    local.write(100, b"from the owner").unwrap();
    let rb = b.open_timeout("shared", JOIN).unwrap();
    let rc = c.open_timeout("shared", JOIN).unwrap();
    assert!(!rb.is_local());
    assert_eq!(rb.owner(), a.id());
    assert_eq!(rb.len(), 4096);
    assert_eq!(rb.read_vec(100, 14).unwrap(), b"from the owner");
    rc.write(200, b"from c").unwrap();
    assert_eq!(local.read_vec(200, 6).unwrap(), b"from c");
    assert_eq!(rb.read_vec(200, 6).unwrap(), b"from c");

    // Typed u64 views.
    rb.write_u64s(64, &[1, 2, 3, u64::MAX]).unwrap();
    assert_eq!(rc.read_u64s(64, 4).unwrap(), vec![1, 2, 3, u64::MAX]);
    assert_eq!(local.read_u64s(65, 2).unwrap(), vec![2, 3]);

    // Atomics from two nodes and the owner.
    for _ in 0..10 {
        rb.fetch_add(0, 1).unwrap();
        rc.fetch_add(0, 2).unwrap();
        local.fetch_add(0, 3).unwrap();
    }
    assert_eq!(local.read_u64s(0, 1).unwrap(), vec![60]);
    assert_eq!(rb.compare_and_swap(0, 60, 7).unwrap(), 60);
    assert_eq!(
        rc.compare_and_swap(0, 60, 9).unwrap(),
        7,
        "failed CAS yields the current value"
    );
    assert_eq!(rc.read_u64s(0, 1).unwrap(), vec![7]);

    // Large transfers go in chunks.
    let big = a.export("big", 3 << 20, Rights::ALL).unwrap();
    let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i * 7 + 3) as u8).collect();
    let rbig = b.open_timeout("big", JOIN).unwrap();
    rbig.write(0, &data).unwrap();
    assert_eq!(big.read_vec(0, data.len() as u64).unwrap(), data);
    assert_eq!(
        rbig.read_vec(12345, 2 << 20).unwrap(),
        &data[12345..12345 + (2 << 20)]
    );
    assert!(a.names().contains(&"big".to_string()));
}

#[test]
fn bad_input_is_a_typed_error_naming_the_buffer_and_writes_nothing() {
    let nodes = cluster(2, "tcp", |c| c);
    let (a, b) = (&nodes[0], &nodes[1]);
    let owned = a.export("data", 64, Rights::ALL).unwrap();
    owned.write(0, &[0xAA; 64]).unwrap();
    let remote = b.open_timeout("data", JOIN).unwrap();

    // A name nobody exports.
    let e = b.open("no-such-region").unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    assert!(e.to_string().contains("no-such-region"), "{e}");

    // Out of range, on the owner and remotely: nothing written.
    for buf in [&owned, &remote] {
        let e = buf.write(60, &[0u8; 8]).unwrap_err();
        assert!(
            matches!(
                e,
                Error::OutOfRange {
                    offset: 60,
                    len: 8,
                    size: 64,
                    ..
                }
            ),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("\"data\"") && msg.contains("60..68") && msg.contains("64"),
            "{msg}"
        );
        assert!(matches!(
            buf.read_vec(u64::MAX, 2),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(buf.read_u64s(8, 1), Err(Error::OutOfRange { .. })));
        assert!(matches!(
            buf.write_u64s(u64::MAX / 4, &[1]),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            buf.fetch_add(64, 1),
            Err(Error::OutOfRange { .. })
        ));
        let e = buf.compare_and_swap(4, 0, 1).unwrap_err();
        assert!(matches!(e, Error::Misaligned { offset: 4, .. }), "{e:?}");
        assert!(matches!(
            buf.dispatch_range(10..70, "sum", &[]),
            Err(Error::OutOfRange { .. })
        ));
    }
    assert_eq!(owned.read_vec(0, 64).unwrap(), vec![0xAA; 64]);

    // A read-only handle refuses writes and atomics, and writes nothing.
    for ro in [owned.read_only(), remote.read_only()] {
        let e = ro.write(0, b"x").unwrap_err();
        assert!(matches!(e, Error::ReadOnly { op: "write", .. }), "{e:?}");
        assert!(e.to_string().contains("\"data\" is read-only"), "{e}");
        assert!(matches!(ro.fetch_add(0, 1), Err(Error::ReadOnly { .. })));
        assert!(matches!(
            ro.write_u64s(0, &[1]),
            Err(Error::ReadOnly { .. })
        ));
        assert_eq!(
            ro.read_vec(0, 4).unwrap(),
            vec![0xAA; 4],
            "reads still work"
        );
        assert!(matches!(
            ro.copy_to(0, &ro, 8, 8),
            Err(Error::ReadOnly { .. })
        ));
    }
    // An export without write rights hands out read-only handles.
    a.export("ro-export", 16, Rights::READ).unwrap();
    let e = b
        .open_timeout("ro-export", JOIN)
        .unwrap()
        .write(0, b"x")
        .unwrap_err();
    assert!(matches!(e, Error::ReadOnly { .. }), "{e:?}");
    assert_eq!(owned.read_vec(0, 64).unwrap(), vec![0xAA; 64]);

    // Names: taken, empty, too long; empty regions.
    let e = b.export("data", 8, Rights::ALL).unwrap_err();
    assert!(
        matches!(e, Error::NameTaken { owner, .. } if owner == a.id()),
        "{e:?}"
    );
    assert!(matches!(
        a.export("", 8, Rights::ALL),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        a.export(&"x".repeat(300), 8, Rights::ALL),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        a.export("zero", 0, Rights::ALL),
        Err(Error::InvalidArgument(_))
    ));

    // Unexport: the name goes away everywhere.
    a.unexport("ro-export").unwrap();
    let deadline = Instant::now() + JOIN;
    while b.open("ro-export").is_ok() {
        assert!(Instant::now() < deadline, "the removal never reached b");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn third_party_copy_goes_owner_to_owner() {
    let nodes = cluster(3, "tcp", |c| c);
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let src = a.export("src", 2 << 20, Rights::ALL).unwrap();
    let dst = b.export("dst", 2 << 20, Rights::ALL).unwrap();
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    src.write(4096, &data).unwrap();
    let (csrc, cdst) = (
        c.open_timeout("src", JOIN).unwrap(),
        c.open_timeout("dst", JOIN).unwrap(),
    );
    let before = c.endpoint().stats();
    csrc.copy_to(4096, &cdst, 100, data.len() as u64).unwrap();
    let after = c.endpoint().stats();
    assert_eq!(dst.read_vec(100, data.len() as u64).unwrap(), data);
    let moved = (after.bytes_read + after.bytes_written + after.message_bytes_received)
        - (before.bytes_read + before.bytes_written + before.message_bytes_received);
    assert!(
        moved < 64 << 10,
        "the data passed through the caller: {moved} bytes"
    );
    // The owner issuing: a copies into b.
    src.copy_to(0, &cdst, 0, 10).unwrap();
    // Bad ranges on either side: nothing copied.
    let e = csrc.copy_to(0, &cdst, (2 << 20) - 5, 10).unwrap_err();
    assert!(
        matches!(e, Error::OutOfRange { ref name, .. } if name == "dst"),
        "{e:?}"
    );
    let e = csrc.copy_to((2 << 20) - 5, &cdst, 0, 10).unwrap_err();
    assert!(
        matches!(e, Error::OutOfRange { ref name, .. } if name == "src"),
        "{e:?}"
    );
    assert!(matches!(
        csrc.copy_to(0, &cdst.read_only(), 0, 8),
        Err(Error::ReadOnly { .. })
    ));
}

#[test]
fn tasks_run_at_the_owner_with_typed_errors() {
    let nodes = cluster(2, "tcp", |c| c.task_timeout(Duration::from_secs(1)));
    let (a, b) = (&nodes[0], &nodes[1]);
    let owned = a.export("nums", 8 * 1000, Rights::ALL).unwrap();
    let vals: Vec<u64> = (0..1000).map(|i| i * 3 + 1).collect();
    owned.write_u64s(0, &vals).unwrap();
    let remote = b.open_timeout("nums", JOIN).unwrap();
    let expect: u64 = vals.iter().sum();
    assert_eq!(sum_of(&remote.dispatch("sum", &[]).unwrap()), expect);
    assert_eq!(
        sum_of(&owned.dispatch("sum", &[]).unwrap()),
        expect,
        "local dispatch"
    );
    let part = remote.dispatch_range(80..160, "sum", &[]).unwrap();
    assert_eq!(sum_of(&part), vals[10..20].iter().sum::<u64>());
    let out = remote.dispatch_range(8..24, "echo_len", b"args").unwrap();
    assert_eq!(&out[..8], &16u64.to_le_bytes());
    assert_eq!(&out[8..], b"args");

    // Unknown task: named, with what the owner has.
    let e = remote.dispatch("no_such_task", &[]).unwrap_err();
    match &e {
        Error::UnknownTask {
            task,
            node,
            registered,
        } => {
            assert_eq!(task, "no_such_task");
            assert_eq!(*node, a.id());
            assert!(registered.contains("sum"), "{registered}");
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("no_such_task"));
    // A panic is caught and reported; the owner keeps serving.
    for buf in [&remote, &owned] {
        let e = buf.dispatch("panics", &[]).unwrap_err();
        assert!(
            matches!(&e, Error::TaskPanicked { message, .. } if message.contains("deliberate")),
            "{e:?}"
        );
    }
    let e = remote.dispatch("fails", &[]).unwrap_err();
    assert!(
        matches!(&e, Error::TaskFailed { message, .. } if message == "no good"),
        "{e:?}"
    );
    // A task reading past its window gets an error it can pass on.
    let e = remote
        .dispatch_range(0..8, "first_bytes", &16u64.to_le_bytes())
        .unwrap_err();
    assert!(
        matches!(&e, Error::TaskFailed { message, .. } if message.contains("16")),
        "{e:?}"
    );
    let e = remote
        .dispatch_range(0..8, "first_bytes", &u64::MAX.to_le_bytes())
        .unwrap_err();
    assert!(matches!(&e, Error::TaskFailed { .. }), "{e:?}");
    // A task that outlives the deadline.
    let t = Instant::now();
    let e = remote
        .dispatch("sleeps", &1500u64.to_le_bytes())
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(1) + Duration::from_millis(1500));
    assert_eq!(
        sum_of(&remote.dispatch("sum", &[]).unwrap()),
        expect,
        "owner still up"
    );
}

/// The owner runs a task on the thread that read its request; a long one must hold up
/// nothing that comes behind it on the same connection: other requests, and membership
/// traffic (or the owner would take the caller for dead).
fn a_long_task_holds_up_nothing(scheme: &str) {
    let nodes = cluster(2, scheme, |c| c);
    let (a, b) = (&nodes[0], &nodes[1]);
    let owned = a.export("slow", 8 * 1000, Rights::ALL).unwrap();
    owned
        .write_u64s(0, &(0..1000).collect::<Vec<u64>>())
        .unwrap();
    let remote = b.open_timeout("slow", JOIN).unwrap();
    // Longer than failure detection takes to find a dead node.
    let sleep = fast_fd().detection_bound(2) + Duration::from_millis(500);
    std::thread::scope(|s| {
        let long = s.spawn(|| remote.dispatch("sleeps", &(sleep.as_millis() as u64).to_le_bytes()));
        std::thread::sleep(Duration::from_millis(100));
        let mut quick = 0;
        while !long.is_finished() {
            let t = Instant::now();
            assert_eq!(sum_of(&remote.dispatch("sum", &[]).unwrap()), 499_500);
            assert_eq!(remote.read_u64s(999, 1).unwrap(), vec![999]);
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "{scheme}: a short task waited {:?} behind a long one",
                t.elapsed()
            );
            assert!(!a.is_down(b.id()) && !b.is_down(a.id()), "{scheme}");
            quick += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        long.join().unwrap().unwrap();
        assert!(
            quick >= 10,
            "{scheme}: only {quick} short tasks ran meanwhile"
        );
    });
    // Many callers at once over the same connection: one reads it while it waits and
    // hands the others their answers.
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..50 {
                    assert_eq!(sum_of(&remote.dispatch("sum", &[]).unwrap()), 499_500);
                }
            });
        }
    });
    assert!(!a.is_down(b.id()) && !b.is_down(a.id()), "{scheme}");
}

#[test]
fn a_long_task_holds_up_nothing_tcp() {
    a_long_task_holds_up_nothing("tcp");
}

#[test]
fn a_long_task_holds_up_nothing_udp() {
    a_long_task_holds_up_nothing("udp");
}

#[test]
fn an_owner_refuses_requests_beyond_its_limit() {
    let nodes = cluster(2, "tcp", |c| c.max_concurrent_tasks(1));
    let (a, b) = (&nodes[0], &nodes[1]);
    a.export("one-at-a-time", 64, Rights::ALL).unwrap();
    let remote = b.open_timeout("one-at-a-time", JOIN).unwrap();
    std::thread::scope(|s| {
        let long = s.spawn(|| remote.dispatch("sleeps", &1000u64.to_le_bytes()));
        std::thread::sleep(Duration::from_millis(200));
        let e = remote.dispatch("sum", &[]).unwrap_err();
        assert!(
            matches!(&e, Error::Remote { message, .. } if message.contains("busy")),
            "{e:?}"
        );
        long.join().unwrap().unwrap();
    });
    assert_eq!(sum_of(&remote.dispatch("sum", &[]).unwrap()), 0);
}

#[test]
fn striped_array_global_addressing_and_map_reduce() {
    let nodes = cluster(3, "tcp", |c| c);
    let (a, b) = (&nodes[0], &nodes[1]);
    // 10_001 u64s over 3 nodes: stripes of unequal logical length.
    let n = 10_001u64;
    let arr = a.create_striped("vec", n * 8, 3).unwrap();
    assert_eq!(arr.stripes().len(), 3);
    let owners: std::collections::HashSet<u64> = arr.stripes().iter().map(|s| s.owner()).collect();
    assert_eq!(owners.len(), 3, "one stripe per node");
    let vals: Vec<u64> = (0..n)
        .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40)
        .collect();
    arr.write_u64s(0, &vals).unwrap();
    // Read back across a stripe boundary, from another node.
    let arr_b = {
        let deadline = Instant::now() + JOIN;
        loop {
            match b.open_striped("vec") {
                Ok(x) => break x,
                Err(e) => {
                    assert!(Instant::now() < deadline, "{e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    };
    let boundary = arr.stripe_len() / 8;
    let got = arr_b.read_u64s(boundary - 3, 6).unwrap();
    assert_eq!(got, &vals[(boundary - 3) as usize..(boundary + 3) as usize]);
    let total = arr_b
        .map_reduce("sum", &[], 0u64, |acc, r| acc.wrapping_add(sum_of(&r)))
        .unwrap();
    assert_eq!(total, vals.iter().fold(0u64, |s, v| s.wrapping_add(*v)));

    // Past the end: typed, names the array and the range, nothing written.
    let e = arr_b.write_u64s(n - 1, &[1, 2]).unwrap_err();
    assert!(
        matches!(e, Error::OutOfRange { ref name, .. } if name == "vec"),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .contains(&format!("{}..{}", (n - 1) * 8, (n + 1) * 8)),
        "{e}"
    );
    assert_eq!(
        arr.read_u64s(n - 1, 1).unwrap(),
        vec![vals[(n - 1) as usize]]
    );
    assert!(matches!(arr.read_u64s(n, 1), Err(Error::OutOfRange { .. })));
    // Past one stripe's end, through the stripe's own handle: names the stripe.
    let s1 = &arr_b.stripes()[1];
    let before = s1.read_vec(arr.stripe_len() - 8, 8).unwrap();
    let e = s1.write(arr.stripe_len() - 4, &[0u8; 8]).unwrap_err();
    assert!(
        matches!(e, Error::OutOfRange { ref name, .. } if name == "vec#1"),
        "{e:?}"
    );
    assert!(e.to_string().contains("vec#1"), "{e}");
    assert_eq!(s1.read_vec(arr.stripe_len() - 8, 8).unwrap(), before);
    let end = arr.stripe_len();
    assert!(matches!(
        s1.dispatch_range(end - 8..end + 8, "sum", &[]),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        a.create_striped("too-wide", 64, 4),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        b.open_striped("nope"),
        Err(Error::NotFound { .. })
    ));
    // map_reduce reports an unknown task.
    assert!(matches!(
        arr.map_reduce("nope", &[], (), |_, _| ()),
        Err(Error::UnknownTask { .. })
    ));
}

#[test]
fn stopped_owner_fails_its_buffers_and_others_keep_working() {
    let mut nodes = cluster(3, "tcp", |c| c);
    let c = nodes.pop().unwrap();
    let (a, b) = (&nodes[0], &nodes[1]);
    c.export("on-c", 64, Rights::ALL).unwrap();
    a.export("on-a", 64, Rights::ALL).unwrap();
    let from_b_c = b.open_timeout("on-c", JOIN).unwrap();
    let from_b_a = b.open_timeout("on-a", JOIN).unwrap();
    from_b_c.write(0, b"before").unwrap();
    let c_id = c.id();
    drop(c);
    let t = Instant::now();
    let bound = fast_fd().detection_bound(3) + Duration::from_secs(5);
    while !b.is_down(c_id) {
        assert!(t.elapsed() < bound, "c not marked down within {bound:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let e = from_b_c.write(0, b"after").unwrap_err();
    assert!(
        matches!(e, Error::OwnerDown { ref name, .. } if name == "on-c"),
        "{e:?}"
    );
    assert!(matches!(
        b.open("on-c").unwrap().read_vec(0, 1),
        Err(Error::OwnerDown { .. })
    ));
    assert!(matches!(
        from_b_c.dispatch("sum", &[]),
        Err(Error::OwnerDown { .. })
    ));
    from_b_a.write(0, b"still fine").unwrap();
    assert_eq!(from_b_a.read_vec(0, 10).unwrap(), b"still fine");
    // The name of a down owner may be exported again.
    b.export("on-c", 8, Rights::ALL).unwrap();
}

#[test]
fn udp_backend_works_the_same() {
    let nodes = cluster(2, "udp", |c| c);
    let (a, b) = (&nodes[0], &nodes[1]);
    let owned = a.export("u", 1 << 16, Rights::ALL).unwrap();
    let r = b.open_timeout("u", JOIN).unwrap();
    let data: Vec<u8> = (0..(1u32 << 16)).map(|i| i as u8).collect();
    r.write(0, &data).unwrap();
    assert_eq!(owned.read_vec(0, 1 << 16).unwrap(), data);
    assert_eq!(
        r.fetch_add(8, 5).unwrap(),
        u64::from_le_bytes(data[8..16].try_into().unwrap())
    );
    let s = r.dispatch("sum", &[]).unwrap();
    assert_eq!(
        sum_of(&s),
        owned
            .read_u64s(0, 8192)
            .unwrap()
            .iter()
            .fold(0u64, |a, v| a.wrapping_add(*v))
    );
}

#[test]
fn cluster_secret_is_required_to_join() {
    let secret = Secret::from_bytes(b"0123456789abcdef-memshare-test").unwrap();
    let other = Secret::from_bytes(b"fedcba9876543210-another-secret").unwrap();
    let nodes = cluster(2, "tcp", |c| c.secret(secret.clone()));
    nodes[0].export("secret-data", 8, Rights::ALL).unwrap();
    nodes[1]
        .open_timeout("secret-data", JOIN)
        .unwrap()
        .write(0, b"ok")
        .unwrap();
    let intruder = Node::start(
        config("tcp://127.0.0.1:0")
            .seed(nodes[0].addr())
            .secret(other),
    )
    .unwrap();
    let open = Node::start(config("tcp://127.0.0.1:0").seed(nodes[0].addr())).unwrap();
    // Both keep trying to join for a while (every 500 ms), and never get in.
    std::thread::sleep(Duration::from_millis(1500));
    for n in [&intruder, &open] {
        assert!(n.members().is_empty(), "{:?}", n.members());
        let e = n
            .wait_for_members(1, Duration::from_millis(10))
            .unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
        assert!(matches!(n.open("secret-data"), Err(Error::NotFound { .. })));
    }
    assert_eq!(nodes[0].members().len(), 1, "{:?}", nodes[0].members());
}

#[test]
fn config_from_a_file_starts_a_node() {
    let dir = std::env::temp_dir().join(format!("pfs-memshare-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("node.toml");
    std::fs::write(
        &path,
        "listen = \"tcp://127.0.0.1:0\"\ntask_timeout_ms = 1234\n",
    )
    .unwrap();
    let cfg = NodeConfig::from_file(&path).unwrap();
    assert_eq!(cfg.task_timeout, Duration::from_millis(1234));
    let n = Node::start(cfg).unwrap();
    assert!(n.addr().starts_with("tcp://127.0.0.1:"));
    std::fs::write(
        &path,
        "listen = \"tcp://127.0.0.1:0\"\n[failure_detection]\nprobe_period = 5\n",
    )
    .unwrap();
    let e = NodeConfig::from_file(&path).unwrap_err().to_string();
    assert!(
        e.contains("node.toml") && e.contains("probe_period") && e.contains("line 3"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn late_joiners_learn_the_directory_and_no_node_is_special() {
    let mut nodes = cluster(3, "tcp", |c| c);
    // b and c export; then the seed (a) leaves.
    nodes[1]
        .export("on-b", 64, Rights::ALL)
        .unwrap()
        .write(0, b"b's bytes")
        .unwrap();
    nodes[2].export("on-c", 64, Rights::ALL).unwrap();
    nodes[2].open_timeout("on-b", JOIN).unwrap();
    let a = nodes.remove(0);
    let a_addr = a.addr().to_string();
    drop(a);
    let (b, c) = (&nodes[0], &nodes[1]);
    // A node joining through c, after every broadcast went out, learns both names
    // from their owners.
    let late =
        Node::start(config("tcp://127.0.0.1:0").seeds([a_addr, c.addr().to_string()])).unwrap();
    late.wait_for_members(2, JOIN).unwrap();
    let got = late.open_timeout("on-b", JOIN).unwrap();
    assert_eq!(got.read_vec(0, 9).unwrap(), b"b's bytes");
    late.open_timeout("on-c", JOIN).unwrap();
    // And lookups on the survivors never needed a.
    assert_eq!(c.open("on-b").unwrap().owner(), b.id());
    assert_eq!(b.open("on-c").unwrap().owner(), c.id());
}

#[test]
fn a_wrong_key_or_a_stale_handle_is_refused_by_the_owner() {
    let nodes = cluster(2, "tcp", |c| c);
    let (a, b) = (&nodes[0], &nodes[1]);
    a.export("gone-soon", 64, Rights::ALL).unwrap();
    let h = b.open_timeout("gone-soon", JOIN).unwrap();
    h.write(0, b"ok").unwrap();
    a.unexport("gone-soon").unwrap();
    // The owner revoked the keys: one-sided access and task dispatch are refused.
    assert!(h.write(0, b"no").is_err());
    let e = h.dispatch("sum", &[]).unwrap_err();
    assert!(
        matches!(&e, Error::Remote { message, .. } if message.contains("gone-soon")),
        "{e:?}"
    );
    assert!(matches!(
        a.unexport("gone-soon"),
        Err(Error::InvalidArgument(_))
    ));
}
