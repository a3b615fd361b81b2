use super::*;

async fn read_all(log: &StepLog) -> Vec<u8> {
    let mut got = Vec::new();
    log.follow(|b| got.extend_from_slice(b)).await.unwrap();
    got
}

#[tokio::test]
async fn follower_sees_everything_even_after_rename() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let log = StepLog::create(&path).unwrap();
    log.write(b"one\n").unwrap();
    let l2 = log.clone();
    let follower = tokio::spawn(async move { read_all(&l2).await });
    tokio::task::yield_now().await;
    std::fs::rename(&path, dir.path().join("moved")).unwrap();
    log.write(b"two\n").unwrap();
    log.finish();
    assert_eq!(follower.await.unwrap(), b"one\ntwo\n");
    let replay = StepLog::open_finished(&dir.path().join("moved")).unwrap();
    assert_eq!(read_all(&replay).await, b"one\ntwo\n");
}

fn masked(values: &[&str]) -> LogOptions {
    LogOptions {
        masked: values.iter().map(|v| v.as_bytes().to_vec()).collect(),
        ..LogOptions::default()
    }
}

#[tokio::test]
async fn secrets_are_masked_even_when_split_across_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let log = StepLog::create_with(&path, &masked(&["hunter2\n", "s3"])).unwrap();
    // Split at every position of "the password is hunter2, s3!".
    let text = b"the password is hunter2, s3! and hunter again; hunter2";
    for cut in [1, 5, 17, 20, 22] {
        log.write(&text[..cut]).unwrap();
        log.write(&text[cut..]).unwrap();
        log.write(b"\n").unwrap();
    }
    log.write(b"hunt").unwrap();
    log.finish();
    let got = String::from_utf8(read_all(&log).await).unwrap();
    assert!(!got.contains("hunter2") && !got.contains("s3"), "{got}");
    assert_eq!(
        got.lines().next().unwrap(),
        "the password is ***, ***! and hunter again; ***"
    );
    assert_eq!(got.lines().count(), 6, "lines are kept: {got:?}");
    assert!(
        got.ends_with("\nhunt"),
        "held-back bytes come out at the end: {got:?}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), got);
}

#[tokio::test]
async fn a_long_log_keeps_its_head_and_tail_and_says_what_was_cut() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let opts = LogOptions {
        max_bytes: 2000,
        ..LogOptions::default()
    };
    let log = StepLog::create_with(&path, &opts).unwrap();
    for i in 0..10_000 {
        log.write(format!("line {i}\n").as_bytes()).unwrap();
    }
    log.finish();
    let got = String::from_utf8(read_all(&log).await).unwrap();
    assert!(got.starts_with("line 0\nline 1\n"), "{got}");
    assert!(got.ends_with("line 9999\n"), "{got}");
    assert!(got.contains("[obuilder: the log passed 1000 B;"), "{got}");
    assert!(
        got.contains(" of output cut here; the last 1000 B follow]"),
        "{got}"
    );
    assert!(got.len() < 2400, "{}", got.len());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), got);
}

/// A full log filesystem (here `/dev/full`, where every write fails with ENOSPC): the
/// writer keeps accepting output and the step's last words reach the followers.
#[tokio::test]
async fn a_full_disk_keeps_the_last_words_in_memory() {
    let full = Path::new("/dev/full");
    if !full.exists() {
        return;
    }
    let log = StepLog::create_with(
        full,
        &LogOptions {
            max_bytes: 4096,
            ..LogOptions::default()
        },
    )
    .unwrap();
    for i in 0..1000 {
        log.write(format!("line {i}\n").as_bytes()).unwrap();
    }
    log.write(b"the last words\n").unwrap();
    assert!(String::from_utf8_lossy(&log.last_bytes(15)).ends_with("the last words\n"));
    log.finish();
    let got = String::from_utf8(read_all(&log).await).unwrap();
    assert!(got.ends_with("line 999\nthe last words\n"), "{got}");
    assert!(got.contains("cut here"), "{got}");
}

#[test]
fn events_serialise_as_json_lines() {
    for (e, json) in [
        (
            LogEvent::Heading("(from busybox)".into()),
            r#"{"event":"heading","text":"(from busybox)"}"#,
        ),
        (
            LogEvent::Note("---> saved".into()),
            r#"{"event":"note","text":"---> saved"}"#,
        ),
        (
            LogEvent::Output(b"hi\n".to_vec()),
            r#"{"event":"output","text":"hi\n"}"#,
        ),
        (
            LogEvent::Output(vec![0xff, 0, 1, 2, 3]),
            r#"{"event":"output","base64":"/wABAgM="}"#,
        ),
    ] {
        assert_eq!(serde_json::to_string(&e).unwrap(), json);
        assert_eq!(serde_json::from_str::<LogEvent>(json).unwrap(), e);
    }
}

#[test]
fn human_sizes() {
    assert_eq!(human_bytes(999), "999 B");
    assert_eq!(human_bytes(10 << 20), "10.0 MiB");
    assert_eq!(human_bytes(1536), "1.5 KiB");
}

#[test]
fn a_text_is_masked_as_a_log_is() {
    // A secret file's trailing newline is not part of what is masked, as in logs; the
    // longer of two overlapping values wins.
    let secrets = vec![b"hunter2\n".to_vec(), b"s3".to_vec(), b"s3cret".to_vec()];
    assert_eq!(
        mask("echo hunter2 s3cret s3 x", &secrets),
        "echo *** *** *** x"
    );
    assert_eq!(mask("nothing", &[]), "nothing");
}
