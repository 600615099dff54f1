use std::fs;
use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::{MEMBERS, Member, Members};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn members() -> Members {
    Members {
        members: vec![Member {
            name: "cp1".into(),
            addresses: vec![std::net::Ipv4Addr::new(192, 0, 2, 1).into()],
            control_plane: true,
            api_server_port: Some(6443),
            last_seen: 1_760_000_000,
            ..Member::default()
        }],
    }
}

fn setup() -> Result<(tempfile::TempDir, StateDir), std::io::Error> {
    let dir = tempfile::tempdir()?;
    let state = StateDir::new(dir.path());
    Ok((dir, state))
}

/// Writes raw bytes where the members record goes.
fn put(state: &StateDir, bytes: &[u8]) -> Result<PathBuf, std::io::Error> {
    let path = state.record_path(MEMBERS.0, MEMBERS.1);
    fs::create_dir_all(path.parent().unwrap_or(state.root()))?;
    fs::write(&path, bytes)?;
    Ok(path)
}

fn read_members(state: &StateDir) -> Result<Members, Error> {
    state.read(MEMBERS.0, MEMBERS.1)
}

#[test]
fn round_trip_with_envelope() -> TestResult {
    let (_dir, state) = setup()?;
    state.write(MEMBERS.0, MEMBERS.1, &members())?;
    assert_eq!(read_members(&state)?, members());
    let record: Record<Members> = state.read_record(MEMBERS.0, MEMBERS.1)?;
    assert_eq!(
        (
            record.schema,
            record.writer.as_str(),
            record.name.as_str(),
            record.pid,
            record.seq
        ),
        (SCHEMA_VERSION, "meshd", "members", std::process::id(), 1)
    );
    assert!(record.age() < Duration::from_secs(60) && !record.is_stale(Duration::from_secs(60)));
    // The envelope on disk, as documented.
    let path = state.record_path(MEMBERS.0, MEMBERS.1);
    assert_eq!(path, state.root().join("meshd/members.json"));
    let raw: serde_json::Value = serde_json::from_slice(&fs::read(&path)?)?;
    for key in [
        "schema",
        "writer",
        "name",
        "pid",
        "seq",
        "updatedAtMs",
        "data",
    ] {
        assert!(raw.get(key).is_some(), "{key} missing in {raw}");
    }
    assert_eq!(
        fs::metadata(&path)?.permissions().mode() & 0o777,
        RECORD_MODE
    );
    Ok(())
}

#[test]
fn seq_grows_and_continues_across_writers() -> TestResult {
    let (dir, state) = setup()?;
    for _ in 0..3 {
        state.write(MEMBERS.0, MEMBERS.1, &members())?;
    }
    assert_eq!(state.read_record::<Members>(MEMBERS.0, MEMBERS.1)?.seq, 3);
    // A restarted writer (new StateDir) resumes from the file.
    let again = StateDir::new(dir.path());
    again.write(MEMBERS.0, MEMBERS.1, &members())?;
    assert_eq!(again.read_record::<Members>(MEMBERS.0, MEMBERS.1)?.seq, 4);
    Ok(())
}

#[test]
fn unknown_fields_are_ignored() -> TestResult {
    let (_dir, state) = setup()?;
    put(
        &state,
        br#"{"schema":1,"writer":"meshd","pid":1,"seq":7,"updatedAtMs":5,"future":{"x":1},
            "data":{"members":[{"name":"a","controlPlane":true,"newThing":[1,2]}],"alsoNew":1}}"#,
    )?;
    let record: Record<Members> = state.read_record(MEMBERS.0, MEMBERS.1)?;
    assert_eq!((record.seq, record.data.members[0].name.as_str()), (7, "a"));
    Ok(())
}

#[test]
fn bad_files_give_clear_errors() -> TestResult {
    let (_dir, state) = setup()?;
    let missing = read_members(&state).err();
    assert!(
        missing.as_ref().is_some_and(Error::is_not_found),
        "{missing:?}"
    );

    let path = put(&state, b"")?;
    assert!(matches!(read_members(&state), Err(Error::Empty { .. })));
    put(&state, b" \n")?;
    assert!(matches!(read_members(&state), Err(Error::Empty { .. })));

    put(&state, b"{\"schema\":1,\"data\":{\"members\":[}")?;
    let corrupt = read_members(&state).err();
    assert!(
        matches!(&corrupt, Some(Error::Corrupt { .. })),
        "{corrupt:?}"
    );

    // A truncated good record.
    state.write(MEMBERS.0, MEMBERS.1, &members())?;
    let full = fs::read(&path)?;
    put(&state, &full[..full.len() / 2])?;
    let truncated = read_members(&state).err();
    assert!(
        matches!(&truncated, Some(Error::Corrupt { .. })),
        "{truncated:?}"
    );
    let message = truncated.map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.contains("members.json") && message.contains("not a valid record"),
        "{message}"
    );

    put(&state, b"{\"members\":[]}")?; // data without the envelope
    assert!(matches!(read_members(&state), Err(Error::Corrupt { .. })));
    put(&state, b"{\"schema\":0,\"data\":{}}")?;
    assert!(matches!(read_members(&state), Err(Error::Corrupt { .. })));

    put(
        &state,
        b"{\"schema\":2,\"writer\":\"meshd\",\"data\":{\"new\":\"shape\"}}",
    )?;
    let newer = read_members(&state).err();
    assert!(
        matches!(
            &newer,
            Some(Error::NewerSchema {
                found: 2,
                supported: 1,
                ..
            })
        ),
        "{newer:?}"
    );
    assert!(
        newer
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("newer")
    );

    put(
        &state,
        b"{\"schema\":1,\"data\":{\"members\":\"not a list\"}}",
    )?;
    assert!(matches!(read_members(&state), Err(Error::Data { .. })));
    Ok(())
}

#[test]
fn directory_in_place_of_the_record() -> TestResult {
    let (_dir, state) = setup()?;
    let path = state.record_path(MEMBERS.0, MEMBERS.1);
    fs::create_dir_all(&path)?;
    let read = read_members(&state).err();
    assert!(
        matches!(&read, Some(Error::Io { path: p, .. }) if p == &path),
        "{read:?}"
    );
    let write = state.write(MEMBERS.0, MEMBERS.1, &members()).err();
    assert!(
        matches!(&write, Some(Error::Io { path: p, .. }) if p == &path),
        "{write:?}"
    );
    // No temp file left beside it.
    assert_eq!(
        fs::read_dir(path.parent().unwrap_or(state.root()))?.count(),
        1
    );
    Ok(())
}

#[test]
fn oversized_record_is_refused() -> TestResult {
    let (_dir, state) = setup()?;
    let path = put(&state, b"")?;
    fs::File::options()
        .write(true)
        .open(&path)?
        .set_len(MAX_RECORD_SIZE + 1)?;
    assert!(matches!(read_members(&state), Err(Error::TooLarge { .. })));
    Ok(())
}

#[test]
fn first_write_removes_stale_temps_and_readers_ignore_them() -> TestResult {
    let (_dir, state) = setup()?;
    let path = put(&state, b"")?;
    fs::remove_file(&path)?;
    let stale = path.with_file_name(".members.json.tmp.4000000.deadbeef");
    fs::write(&stale, b"{\"schema\":1,\"data\":{\"mem")?;
    assert!(read_members(&state).err().is_some_and(|e| e.is_not_found()));
    state.write(MEMBERS.0, MEMBERS.1, &members())?;
    assert!(!stale.exists());
    assert_eq!(read_members(&state)?, members());
    Ok(())
}

#[test]
fn names_are_checked() -> TestResult {
    let (_dir, state) = setup()?;
    for (writer, name) in [
        ("", "x"),
        ("..", "x"),
        ("meshd", "a/b"),
        ("meshd", ".hidden"),
        ("a/b", "x"),
    ] {
        assert!(
            matches!(
                state.write(writer, name, &1),
                Err(Error::InvalidName { .. })
            ),
            "{writer:?} {name:?}"
        );
        assert!(matches!(
            state.read::<u32>(writer, name),
            Err(Error::InvalidName { .. })
        ));
    }
    Ok(())
}

#[test]
fn status_helpers_and_remove() -> TestResult {
    let (_dir, state) = setup()?;
    let status = DaemonStatus {
        daemon: "dnslocal".into(),
        ready: true,
        ..DaemonStatus::default()
    };
    state.write_status(&status)?;
    assert_eq!(state.read_status("dnslocal")?.data, status);
    assert!(state.root().join("dnslocal/status.json").is_file());
    state.remove("dnslocal", STATUS)?;
    state.remove("dnslocal", STATUS)?;
    assert!(
        state
            .read_status("dnslocal")
            .err()
            .is_some_and(|e| e.is_not_found())
    );
    Ok(())
}
