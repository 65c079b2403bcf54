//! `[http]`: environment overrides, secrets read from files, and clear errors.

use provisiond::config::Config;
use provisiond::http::HttpSettings;
use std::time::Duration;

fn env(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

#[test]
fn secrets_come_from_files_and_env_overrides_apply() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, value: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, value).unwrap();
        p.display().to_string()
    };
    let config = Config::load_with_env(
        None,
        env(&[
            (
                "PROVISIOND__HTTP__ADMIN_TOKEN_FILE",
                file("admin", "tok-123\n"),
            ),
            (
                "PROVISIOND__HTTP__STRIPE_WEBHOOK_SECRET_FILE",
                file("stripe", "whsec_abc\n"),
            ),
            (
                "PROVISIOND__HTTP__RUNNER_SECRET_FILE",
                file("runner", "run-456"),
            ),
            ("PROVISIOND__HTTP__STRIPE_TOLERANCE", "120s".into()),
            ("PROVISIOND__HTTP__RUNNER_REQUIRE_TIMESTAMP", "true".into()),
            ("PROVISIOND__HTTP__BODY_LIMIT", "1024".into()),
            ("PROVISIOND__HTTP__DEFAULT_REGION", "eu-central".into()),
        ]),
    )
    .unwrap();
    let s = HttpSettings::from_config(&config.http, &config.regions).unwrap();
    assert_eq!(s.admin_token.as_ref().unwrap().expose(), "tok-123");
    assert_eq!(s.stripe_secret.as_ref().unwrap().expose(), "whsec_abc");
    assert_eq!(s.runner_secret.as_ref().unwrap().expose(), "run-456");
    assert_eq!(s.stripe_tolerance, Duration::from_secs(120));
    assert!(s.runner_require_timestamp);
    assert_eq!(
        (s.body_limit, s.default_region.as_str()),
        (1024, "eu-central")
    );
    let printed = format!("{s:?}");
    assert!(
        !printed.contains("tok-123")
            && !printed.contains("whsec_abc")
            && !printed.contains("run-456")
    );
}

#[test]
fn defaults_and_clear_errors() {
    let config = Config::load_with_env(None, Vec::new()).unwrap();
    let s = HttpSettings::from_config(&config.http, &config.regions).unwrap();
    assert!(s.admin_token.is_none() && s.stripe_secret.is_none() && s.runner_secret.is_none());
    assert_eq!(
        (s.stripe_tolerance, s.body_limit),
        (Duration::from_secs(300), 65536)
    );

    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    for (key, value, want) in [
        (
            "PROVISIOND__HTTP__RUNNER_SECRET_FILE",
            empty.display().to_string(),
            "is empty",
        ),
        (
            "PROVISIOND__HTTP__ADMIN_TOKEN_FILE",
            "/nonexistent/admin".to_owned(),
            "http.admin_token_file",
        ),
        (
            "PROVISIOND__HTTP__DEFAULT_REGION",
            "mars".to_owned(),
            "mars",
        ),
    ] {
        let config = Config::load_with_env(None, env(&[(key, value)])).unwrap();
        let e = HttpSettings::from_config(&config.http, &config.regions)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e}");
    }
}
