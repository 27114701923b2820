//! Bad command lines get one line naming the problem and the valid form, exit code 2,
//! and never a panic.

use std::process::Command;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pfs-bench"))
        .args(args)
        .output()
        .expect("run pfs-bench");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_arguments_are_one_line_errors_with_exit_code_2() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["client", "tcp://127.0.0.1:1", "--size", "12Q"],
            "e.g. 64, 4K, 1M",
        ),
        (&["client", "nonsense://x"], "tcp://HOST:PORT"),
        (&["client", "tcp://127.0.0.1"], "missing :PORT"),
        (
            &["client", "127.0.0.1:7000", "--test", "bogus"],
            "possible values",
        ),
        (
            &["run", "--backend", "foo"],
            "expected one of tcp, udp, xdp, rdma",
        ),
        (
            &["client", "tcp://127.0.0.1:1", "--duration", "0"],
            "more than 0",
        ),
        (&["client", "tcp://127.0.0.1:1", "--depth", "0"], "--depth"),
        (&["server", "--listen", "tcp://:x"], "invalid address"),
        (&["bogus"], "bogus"),
    ];
    for (args, hint) in cases {
        let (code, stdout, stderr) = run(args);
        assert_eq!(code, 2, "{args:?}: exit code {code}, stderr {stderr}");
        assert!(stdout.is_empty(), "{args:?}: printed to stdout: {stdout}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{args:?}: not one line: {stderr}"
        );
        assert!(stderr.contains(hint), "{args:?}: {stderr:?} lacks {hint:?}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn help_and_version_succeed() {
    let (code, stdout, _) = run(&["--help"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("compare"));
    let (code, stdout, _) = run(&["--version"]);
    assert_eq!(code, 0);
    assert!(stdout.contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn unreachable_server_is_an_error_not_a_hang() {
    let (code, _, stderr) = run(&["client", "tcp://127.0.0.1:1", "--duration", "1s"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("connect"), "{stderr}");
}

#[test]
fn json_output_follows_the_schema() {
    let dir = std::env::temp_dir().join(format!("pfs-bench-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("run.json");
    let csv = dir.join("run.csv");
    let (code, stdout, stderr) = run(&[
        "run",
        "--duration",
        "200ms",
        "--json",
        file.to_str().unwrap(),
        "--csv",
        csv.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    // The CSV has a header and one row per result, all with the same number of fields.
    let text = std::fs::read_to_string(&csv).unwrap();
    let rows: Vec<&str> = text.lines().collect();
    assert!(rows[0].starts_with("backend,test,size,depth,"), "{text}");
    let columns = rows[0].split(',').count();
    assert!(rows.len() > 1, "{text}");
    assert!(rows[0].ends_with(",mode,connections,sweep"), "{text}");
    for r in &rows[1..] {
        // The mode column is quoted and may hold commas; two columns follow it.
        let (head, rest) = r.split_once(",\"").expect("a quoted mode column");
        let (_mode, tail) = rest.rsplit_once('"').expect("the mode's closing quote");
        assert_eq!(
            head.split(',').count() + 1 + tail.split(',').count() - 1,
            columns,
            "{r}"
        );
        assert_eq!(tail, ",1,", "one connection, no sweep: {r}");
    }
    assert!(stdout.contains("Reality check"), "{stdout}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(v["schema"], 1);
    assert_eq!(v["tool"], "pfs-bench");
    let results = v["results"].as_array().unwrap();
    assert!(!results.is_empty());
    for r in results {
        for field in [
            "backend",
            "test",
            "size",
            "depth",
            "refill",
            "seconds",
            "ops",
            "gbytes_per_s",
            "mops_per_s",
        ] {
            assert!(!r[field].is_null(), "result lacks {field}: {r}");
        }
        assert!(
            r["ops"].as_u64().unwrap() > 0,
            "no operations completed: {r}"
        );
    }
    let lat = results
        .iter()
        .find(|r| r["test"] == "latency")
        .expect("a latency result");
    assert!(
        lat["latency"]["p999_us"].as_f64().unwrap() >= lat["latency"]["p50_us"].as_f64().unwrap()
    );
    assert!(v["memcpy"]["gbytes_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["reality"]["best_over_memcpy"].as_f64().unwrap() > 0.0);
    assert_eq!(v["reality"]["claim_bytes_per_s"].as_f64().unwrap(), 4e15);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_and_sigint_stop_a_server_with_a_line() {
    use std::io::BufRead;
    for (sig, code, word) in [
        (libc::SIGTERM, 143, "SIGTERM"),
        (libc::SIGINT, 130, "SIGINT"),
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pfs-bench"))
            .args(["server", "--listen", "udp://127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run pfs-bench server");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("listening on udp://"), "{line}");
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as libc::pid_t, sig);
        }
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(code));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(word) && err.contains("stopping"), "{err}");
    }
}

#[test]
fn info_reports_the_machine_and_every_backend() {
    let (code, out, err) = run(&["info", "--json", "-"]);
    assert_eq!(code, 0, "{err}");
    for section in [
        "machine",
        "io_uring",
        "network interfaces",
        "RDMA devices",
        "backends",
    ] {
        assert!(out.contains(section), "no {section} in {out}");
    }
    for backend in ["tcp ", "udp ", "xdp ", "rdma "] {
        assert!(
            out.lines().any(|l| l.trim_start().starts_with(backend)),
            "no line for {backend} in {out}"
        );
    }
    // The JSON document follows the text.
    let json = &out[out.find("\n{").expect("a JSON document") + 1..];
    let v: serde_json::Value = serde_json::from_str(json).expect("valid JSON");
    assert!(v["cpus"].as_u64().unwrap() >= 1);
    assert!(v["backends"]["tcp"].is_object());
}

/// A small sweep (tcp, 2 B to 8 B, 1 and 2 connections) writes a document that `plot`
/// draws as SVG and PNG; its points carry the sweep they belong to and latency CDFs.
#[test]
fn a_sweep_is_plotted_as_svg_and_png() {
    let dir = std::env::temp_dir().join(format!("pfs-bench-sweep-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("sweep.json");
    let (code, stdout, stderr) = run(&[
        "sweep",
        "--backend",
        "tcp",
        "--max-size",
        "8",
        "--max-connections",
        "2",
        "--duration",
        "50ms",
        "--warmup",
        "0",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    // One plain line per point in a pipe: 3 sizes x (bandwidth, latency) + 2 counts.
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.contains(" conn  depth "))
            .count(),
        8,
        "{stdout}"
    );
    assert!(stdout.contains("n½"), "{stdout}");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let results = doc["results"].as_array().unwrap();
    let sizes: Vec<u64> = results
        .iter()
        .filter(|m| m["sweep"] == "size" && m["latency"].is_null())
        .map(|m| m["size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, vec![2, 4, 8]);
    let conns: Vec<u64> = results
        .iter()
        .filter(|m| m["sweep"] == "connections")
        .map(|m| m["connections"].as_u64().unwrap())
        .collect();
    assert_eq!(conns, vec![1, 2]);
    let cdf = results
        .iter()
        .find_map(|m| m["latency"]["cdf"].as_array())
        .expect("a latency CDF");
    assert_eq!(cdf.last().unwrap()[0], 1.0);
    for ext in ["svg", "png"] {
        let out = dir.join(format!("sweep.{ext}"));
        let (code, stdout, stderr) =
            run(&["plot", json.to_str().unwrap(), "-o", out.to_str().unwrap()]);
        assert_eq!(code, 0, "{stdout}\n{stderr}");
        let bytes = std::fs::read(&out).unwrap();
        if ext == "svg" {
            let text = String::from_utf8(bytes).unwrap();
            assert!(text.contains("write bandwidth over message size"));
            assert!(text.contains("tcp write"), "a legend entry per backend");
        } else {
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_sweep_and_plot_input_is_named() {
    let dir = std::env::temp_dir().join(format!("pfs-bench-plot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let not_json = dir.join("x.json");
    std::fs::write(&not_json, "hello").unwrap();
    let other = dir.join("y.json");
    std::fs::write(&other, r#"{"a": 1}"#).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "sweep".into(),
                "--min-size".into(),
                "1M".into(),
                "--max-size".into(),
                "4K".into(),
            ],
            "swap them",
        ),
        (
            vec!["sweep".into(), "--max-size".into(), "1G".into()],
            "largest message",
        ),
        (
            vec!["sweep".into(), "--backend".into(), "xdp".into()],
            "--two-hosts",
        ),
        (
            vec![
                "plot".into(),
                dir.join("missing.json").display().to_string(),
                "-o".into(),
                "a.svg".into(),
            ],
            "cannot read",
        ),
        (
            vec![
                "plot".into(),
                not_json.display().to_string(),
                "-o".into(),
                "a.svg".into(),
            ],
            "is not JSON",
        ),
        (
            vec![
                "plot".into(),
                other.display().to_string(),
                "-o".into(),
                "a.svg".into(),
            ],
            "not a pfs-bench result document",
        ),
        (
            vec![
                "plot".into(),
                other.display().to_string(),
                "-o".into(),
                "a.jpg".into(),
            ],
            "name it .svg or .png",
        ),
    ];
    for (args, hint) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, stderr) = run(&args);
        assert_ne!(code, 0, "{args:?}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(hint), "{args:?}: {stderr:?} lacks {hint:?}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--secret-file`: a server holding the cluster secret serves a client with it, refuses
/// one without it with one line naming the fix, and a readable secret file is refused.
#[test]
fn servers_and_clients_authenticate_with_a_secret_file() {
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("pfs-bench-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, "a-cluster-secret-for-this-test\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let secret = secret.to_str().unwrap().to_string();
    let serve = |listen: &str, extra: &[&str]| {
        let mut server = Command::new(env!("CARGO_BIN_EXE_pfs-bench"))
            .args(["server", "--listen", listen, "--secret-file", &secret])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run pfs-bench server");
        let mut line = String::new();
        let mut out = std::io::BufReader::new(server.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
        let addr = line.trim().rsplit(' ').next().unwrap().to_string();
        (server, addr, out)
    };
    // udp with per-datagram integrity required by the server.
    let (mut server, addr, _out) = serve("udp://127.0.0.1:0", &["--integrity"]);
    let measures = |addr: &str, extra: &[&str]| {
        let mut args = vec!["client", addr, "--duration", "200ms", "--warmup", "0"];
        args.extend_from_slice(&["--secret-file", &secret]);
        args.extend_from_slice(extra);
        let (code, stdout, stderr) = run(&args);
        assert_eq!(code, 0, "{stdout}\n{stderr}");
    };
    measures(&addr, &["--integrity"]);
    let (code, _, stderr) = run(&[
        "client",
        &addr,
        "--duration",
        "200ms",
        "--secret-file",
        &secret,
    ]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("requires per-datagram integrity"),
        "{stderr}"
    );
    let (code, _, stderr) = run(&["client", &addr, "--integrity"]);
    assert_eq!(code, 2, "--integrity needs --secret-file: {stderr}");
    let _ = server.kill();
    let _ = server.wait();
    let (mut server, addr, _out) = serve("tcp://127.0.0.1:0", &[]);
    measures(&addr, &[]);
    let (code, _, stderr) = run(&["client", &addr, "--duration", "200ms"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("authentication failed") && stderr.contains("cluster secret"),
        "{stderr}"
    );
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, stderr) = run(&["client", &addr, "--secret-file", &secret]);
    assert_eq!(code, 1);
    assert!(stderr.contains("chmod 600"), "{stderr}");
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn integrity_is_measured_next_to_the_plain_run() {
    let (code, stdout, stderr) = run(&[
        "run",
        "--backend",
        "udp",
        "--integrity",
        "--duration",
        "150ms",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("udp+mac"), "{stdout}");
    let cost = stdout
        .split("per-datagram integrity")
        .nth(1)
        .expect("an integrity cost section");
    for test in ["write 1 MiB", "read 1 MiB", "latency 64 B"] {
        assert!(cost.contains(&format!("udp {test}")), "{test}: {cost}");
    }
    // tcp has no datagrams to tag.
    let (code, _, stderr) = run(&["run", "--backend", "tcp", "--integrity"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("--integrity measures the datagram backends"),
        "{stderr}"
    );
}

#[test]
fn task_scenario_ships_the_reduction_and_reports_both_ways() {
    let (code, out, err) = run(&[
        "task",
        "--backend",
        "tcp",
        "--size",
        "1M",
        "--pairs",
        "1",
        "--round-trips",
        "5",
        "--json",
        "-",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("pull/ship"), "{out}");
    let json = &out[out.find("{\n").expect("a JSON document")..];
    let doc: serde_json::Value = serde_json::from_str(json).expect("valid JSON");
    let row = &doc["results"][0];
    assert_eq!(row["backend"], "tcp");
    assert!(
        row["pull_bytes_moved"].as_u64().unwrap() >= 1 << 20,
        "{row}"
    );
    assert!(row["ship_bytes_moved"].as_u64().unwrap() < 4096, "{row}");
    let (code, _, err) = run(&["task", "--size", "12"]);
    assert_eq!(code, 1);
    assert!(err.contains("multiple of 8"), "{err}");
}
