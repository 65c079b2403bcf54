//! The shipped example config stays loadable and equal to the defaults it documents.

use provisiond::config::Config;
use std::path::Path;

#[test]
fn example_config_loads_and_matches_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/provisiond.example.toml");
    let example = Config::load_with_env(Some(&path), Vec::new()).expect("example config loads");
    let defaults = Config::load_with_env(None, Vec::new()).unwrap();
    // Debug output covers every key (secrets redacted): the file documents the real defaults.
    assert_eq!(format!("{example:?}"), format!("{defaults:?}"));
}

#[test]
fn a_typo_in_the_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[worker]\nconcurency = 3\n").unwrap();
    let err = Config::load_with_env(Some(&path), Vec::new())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("concurency") && err.contains("bad.toml"),
        "{err}"
    );
}

#[test]
fn database_url_can_come_from_a_credential_file() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("database-url");
    std::fs::write(&secret, "postgres://svc:s3cr3t@db/provisiond\n").unwrap();
    let env = vec![(
        "PROVISIOND__DATABASE__URL_FILE".to_owned(),
        secret.display().to_string(),
    )];
    let config = Config::load_with_env(None, env).unwrap();
    assert_eq!(
        config.database_url().unwrap().expose(),
        "postgres://svc:s3cr3t@db/provisiond"
    );
    assert!(!format!("{config:?}").contains("s3cr3t"));
}

#[test]
fn the_units_fd_limit_leaves_room_above_the_connection_cap() {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/provisiond.service"),
    )
    .unwrap();
    let limit: usize = unit
        .lines()
        .find_map(|l| l.strip_prefix("LimitNOFILE="))
        .expect("the unit sets LimitNOFILE")
        .trim()
        .parse()
        .unwrap();
    let c = Config::load_with_env(None, Vec::new()).unwrap();
    let fixed = c.http.max_connections + c.database.pool_size as usize + 1;
    // Outbound API connections and the runtime need their share too (see the unit's comment).
    let outbound = 2 * c.worker.concurrency;
    assert!(
        limit >= fixed + outbound + 64,
        "LimitNOFILE={limit} leaves too little above {fixed} + {outbound}"
    );
}
