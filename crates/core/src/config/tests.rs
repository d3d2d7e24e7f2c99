use std::collections::HashMap;
use std::io::Write;

use super::*;
use crate::mapping::Mapping;

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn file(content: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(content.as_bytes()).unwrap();
    f
}

fn load_str(content: &str, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let f = file(content);
    Config::load(Some(f.path()), &env(pairs))
}

fn invalid_key(result: Result<Config, ConfigError>) -> String {
    match result {
        Err(ConfigError::Invalid { key, .. }) => key,
        other => panic!("expected an invalid-key error, got {other:?}"),
    }
}

#[test]
fn defaults_without_file_or_env() {
    let config = Config::load(None, &HashMap::new()).unwrap();
    assert_eq!(config.cluster.name, "default");
    assert!(!config.cluster.node_id.is_empty());
    assert_eq!(config.cluster.lease_ttl_secs, 10);
    assert_eq!(config.http.listen, "127.0.0.1:8479");
    assert_eq!(config.postgres.schema, "etcd_sync");
    assert_eq!(config.retry.max_attempts, 10);
    let mappings = config.validated_mappings().unwrap();
    assert_eq!(mappings.len(), 1);
    let only = mappings.iter().next().unwrap();
    assert_eq!(only.prefix, b"");
    assert_eq!(only.table.as_str(), "kv");
    assert_eq!(only.direction, Direction::Both);
    assert_eq!(only.policy, Policy::NewestWins);
}

#[test]
fn environment_overrides_the_file() {
    let config = load_str(
        "[cluster]\nname = \"from-file\"\nlease_ttl_secs = 7\n[etcd]\nendpoints = [\"http://file:2379\"]\n",
        &[
            ("ETCD_PG_SYNC__CLUSTER__NAME", "from-env"),
            ("ETCD_PG_SYNC__ETCD__ENDPOINTS", "http://a:2379,http://b:2379"),
            ("ETCD_PG_SYNC__POSTGRES__POOL_SIZE", "12"),
            ("ETCD_PG_SYNC__SYNC__LISTEN_NOTIFY", "false"),
            ("UNRELATED", "x"),
        ],
    )
    .unwrap();
    assert_eq!(config.cluster.name, "from-env");
    assert_eq!(
        config.cluster.lease_ttl_secs, 7,
        "file value kept where env is silent"
    );
    assert_eq!(
        config.etcd.endpoints,
        vec!["http://a:2379", "http://b:2379"]
    );
    assert_eq!(config.postgres.pool_size, 12);
    assert!(!config.sync.listen_notify);
}

#[test]
fn mappings_from_the_file() {
    let config = load_str(
        r#"
[[mappings]]
prefix = "/app/"
table = "kv_app"
direction = "both"
policy = "manual"

[[mappings]]
prefix = "/cfg/"
table = "kv_cfg"
direction = "etcd-to-pg"
"#,
        &[],
    )
    .unwrap();
    let set = config.validated_mappings().unwrap();
    assert_eq!(set.find(b"/app/x").unwrap().policy, Policy::Manual);
    assert_eq!(set.find(b"/cfg/y").unwrap().direction, Direction::EtcdToPg);
    assert_eq!(set.find(b"/cfg/y").unwrap().policy, Policy::NewestWins);
}

#[test]
fn overlapping_prefixes_name_the_mapping() {
    let err = load_str(
        "[[mappings]]\nprefix = \"/app/\"\ntable = \"a\"\n[[mappings]]\nprefix = \"/app/sub/\"\ntable = \"b\"\n",
        &[],
    );
    assert_eq!(invalid_key(err), "mappings[1].prefix");
}

#[test]
#[allow(clippy::type_complexity)] // a table of cases
fn every_validation_error_names_its_key() {
    let cases: &[(&str, &[(&str, &str)], &str)] = &[
        (
            "[[mappings]]\nprefix = \"/a/\"\ntable = \"a\"\npolicy = \"loudest-wins\"\n",
            &[],
            "mappings[0].policy",
        ),
        (
            "[[mappings]]\nprefix = \"/a/\"\ntable = \"a\"\ndirection = \"sideways\"\n",
            &[],
            "mappings[0].direction",
        ),
        (
            "[[mappings]]\nprefix = \"/a/\"\ntable = \"Robert'); DROP TABLE x;--\"\n",
            &[],
            "mappings[0].table",
        ),
        (
            "[[mappings]]\nprefix = \"/a/\"\ntable = \"outbox\"\n",
            &[],
            "mappings[0].table",
        ),
        (
            "[[mappings]]\nprefix = \"/a/\"\ntable = \"t\"\n[[mappings]]\nprefix = \"/b/\"\ntable = \"t\"\n",
            &[],
            "mappings[1].table",
        ),
        (
            "[[mappings]]\nprefix = \"__etcd_pg_sync/x\"\ntable = \"t\"\n",
            &[],
            "mappings[0].prefix",
        ),
        (
            "",
            &[("ETCD_PG_SYNC__POSTGRES__URL", "not a url")],
            "postgres.url",
        ),
        (
            "",
            &[("ETCD_PG_SYNC__POSTGRES__URL", "mysql://h/db")],
            "postgres.url",
        ),
        (
            "",
            &[("ETCD_PG_SYNC__POSTGRES__SCHEMA", "bad-schema")],
            "postgres.schema",
        ),
        (
            "",
            &[("ETCD_PG_SYNC__POSTGRES__POOL_SIZE", "1")],
            "postgres.pool_size",
        ),
        (
            "",
            &[("ETCD_PG_SYNC__ETCD__ENDPOINTS", "ftp://x")],
            "etcd.endpoints[0]",
        ),
        (
            "",
            &[("ETCD_PG_SYNC__ETCD__ENDPOINTS", "http://ok:1,nonsense")],
            "etcd.endpoints[1]",
        ),
        (
            "",
            &[("ETCD_PG_SYNC__CLUSTER__NAME", "a b")],
            "cluster.name",
        ),
        (
            "",
            &[("ETCD_PG_SYNC__CLUSTER__LEASE_TTL_SECS", "1")],
            "cluster.lease_ttl_secs",
        ),
        (
            "",
            &[("ETCD_PG_SYNC__HTTP__LISTEN", "localhost")],
            "http.listen",
        ),
        (
            "",
            &[("ETCD_PG_SYNC__RETRY__MULTIPLIER", "0.5")],
            "retry.multiplier",
        ),
        ("", &[("ETCD_PG_SYNC__RETRY__MAX_MS", "10")], "retry.max_ms"),
        (
            "",
            &[("ETCD_PG_SYNC__RETRY__MAX_ATTEMPTS", "0")],
            "retry.max_attempts",
        ),
        (
            "",
            &[("ETCD_PG_SYNC__SYNC__BATCH_SIZE", "0")],
            "sync.batch_size",
        ),
        (
            "",
            &[("ETCD_PG_SYNC__ETCD__PASSWORD", "x")],
            "etcd.username",
        ),
        (
            "",
            &[("ETCD_PG_SYNC__ETCD__MAX_TXN_OPS", "1")],
            "etcd.max_txn_ops",
        ),
        (
            "[postgres.tls]\nmode = \"verify-full\"\n",
            &[],
            "postgres.tls.ca_file",
        ),
        ("[etcd.tls]\ncert_file = \"/x\"\n", &[], "etcd.tls.key_file"),
        (
            "[postgres]\npassword_file = \"/nonexistent/secret\"\n",
            &[],
            "postgres.password_file",
        ),
    ];
    for (content, pairs, key) in cases {
        assert_eq!(
            &invalid_key(load_str(content, pairs)),
            key,
            "config {content:?} env {pairs:?}"
        );
    }
}

#[test]
fn parse_errors_name_the_key() {
    let unknown = load_str("[cluster]\nnmae = \"typo\"\n", &[]).unwrap_err();
    assert!(unknown.to_string().contains("nmae"), "{unknown}");
    let wrong_type = load_str("[cluster]\nlease_ttl_secs = \"soon\"\n", &[]).unwrap_err();
    assert!(
        wrong_type.to_string().contains("lease_ttl_secs"),
        "{wrong_type}"
    );
    let bad_toml = load_str("[cluster\n", &[]).unwrap_err();
    assert!(matches!(bad_toml, ConfigError::Parse(_)));
    let missing = Config::load(
        Some(std::path::Path::new("/nonexistent.toml")),
        &HashMap::new(),
    )
    .unwrap_err();
    assert!(missing.to_string().contains("/nonexistent.toml"));
}

#[test]
fn secrets_come_from_files_and_are_redacted() {
    let mut secret = tempfile::NamedTempFile::new().unwrap();
    writeln!(secret, "s3cr3t-pg").unwrap();
    let config = load_str(
        &format!(
            "[postgres]\nurl = \"postgres://app:inline-pass@db:5432/x\"\npassword_file = \"{}\"\n[etcd]\nusername = \"root\"\npassword = \"etcd-pass\"\n",
            secret.path().display()
        ),
        &[],
    )
    .unwrap();
    assert_eq!(
        config.postgres.password.as_ref().unwrap().expose(),
        "s3cr3t-pg"
    );
    assert_eq!(config.etcd.password.as_ref().unwrap().expose(), "etcd-pass");
    let shown = config.to_redacted_toml();
    let debug = format!("{config:?}");
    for secret in ["s3cr3t-pg", "etcd-pass", "inline-pass"] {
        assert!(
            !shown.contains(secret),
            "check-config output leaks {secret}:\n{shown}"
        );
        if secret != "inline-pass" {
            assert!(!debug.contains(secret), "Debug leaks {secret}");
        }
    }
    assert!(
        shown.contains("postgres://app:REDACTED@db:5432/x"),
        "{shown}"
    );
}

#[test]
fn redact_url_hides_only_the_password() {
    assert_eq!(
        redact_url("postgres://u:p@h/db"),
        "postgres://u:REDACTED@h/db"
    );
    assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    assert_eq!(
        redact_url("postgres://u:p@[bad/db"),
        "postgres://<redacted>"
    );
}

#[allow(clippy::type_complexity)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    const KEYS: &[&str] = &[
        "ETCD_PG_SYNC__CLUSTER__NAME",
        "ETCD_PG_SYNC__CLUSTER__LEASE_TTL_SECS",
        "ETCD_PG_SYNC__ETCD__ENDPOINTS",
        "ETCD_PG_SYNC__ETCD__MAX_TXN_OPS",
        "ETCD_PG_SYNC__POSTGRES__URL",
        "ETCD_PG_SYNC__POSTGRES__SCHEMA",
        "ETCD_PG_SYNC__POSTGRES__POOL_SIZE",
        "ETCD_PG_SYNC__SYNC__BATCH_SIZE",
        "ETCD_PG_SYNC__RETRY__MULTIPLIER",
        "ETCD_PG_SYNC__HTTP__LISTEN",
        "ETCD_PG_SYNC__TELEMETRY__LOG_FORMAT",
        "ETCD_PG_SYNC__NOT__A_KEY",
    ];

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Any environment is either a valid configuration or an error that
        /// names what is wrong; never a panic.
        #[test]
        fn arbitrary_environment_values_never_panic(values in proptest::collection::vec((0..KEYS.len(), ".{0,40}"), 0..6)) {
            let env: HashMap<String, String> = values.into_iter().map(|(k, v)| (KEYS[k].to_string(), v)).collect();
            match Config::load(None, &env) {
                Ok(config) => prop_assert!(config.validate().is_ok()),
                Err(error) => prop_assert!(!error.to_string().is_empty()),
            }
        }

        /// Arbitrary file contents likewise.
        #[test]
        fn arbitrary_toml_never_panics(content in "(\\[[a-z.\\[\\]]{0,12}\\]\\n|[a-z_]{1,12} = (\"[^\"\\\\]{0,10}\"|[0-9]{1,6}|true|\\[\\])\\n){0,8}") {
            let f = file(&content);
            let _ = Config::load(Some(f.path()), &HashMap::new());
        }

        /// Mapping prefixes: validation never accepts overlapping ones.
        #[test]
        fn accepted_mappings_never_overlap(prefixes in proptest::collection::vec("[/ab]{0,4}", 1..5)) {
            let mut toml = String::new();
            for (i, prefix) in prefixes.iter().enumerate() {
                toml.push_str(&format!("[[mappings]]\nprefix = \"{prefix}\"\ntable = \"t{i}\"\n"));
            }
            let f = file(&toml);
            if let Ok(config) = Config::load(Some(f.path()), &HashMap::new()) {
                let set = config.validated_mappings().unwrap();
                let all: Vec<&Mapping> = set.iter().collect();
                for (i, a) in all.iter().enumerate() {
                    for b in &all[i + 1..] {
                        prop_assert!(!crate::mapping::prefixes_overlap(&a.prefix, &b.prefix));
                    }
                }
            }
        }
    }
}

fn secret_file(content: &str, mode: u32) -> tempfile::NamedTempFile {
    use std::os::unix::fs::PermissionsExt;
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(content.as_bytes()).unwrap();
    std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(mode)).unwrap();
    f
}

#[test]
fn a_password_anywhere_in_the_url_is_never_printed() {
    let config = load_str(
        "[postgres]\nurl = \"postgres://app:inline-pass@db:5432/x?password=query-pass&application_name=a\"\n",
        &[],
    )
    .unwrap();
    let shown = config.to_redacted_toml();
    let debug = format!("{config:?}");
    let postgres_debug = format!("{:?}", config.postgres);
    for secret in ["inline-pass", "query-pass"] {
        assert!(
            !shown.contains(secret),
            "check-config leaks {secret}:\n{shown}"
        );
        assert!(!debug.contains(secret), "Debug leaks {secret}");
        assert!(!postgres_debug.contains(secret), "Debug leaks {secret}");
    }
    assert!(shown.contains("application_name=a"), "{shown}");
    // An invalid URL with a password is not echoed in the error either.
    let error = load_str(
        "[postgres]\nurl = \"postgres://u:pa ss@[h/db?password=query-pass\"\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        !error.contains("pa ss") && !error.contains("query-pass"),
        "{error}"
    );
}

#[test]
fn toml_syntax_errors_give_the_position_not_the_line() {
    let error = load_str(
        "[etcd]\nusername = \"root\"\npassword = \"hunter2-unterminated\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        !error.contains("hunter2"),
        "the error echoes a secret: {error}"
    );
    assert!(error.contains("line 3"), "{error}");
}

#[test]
fn environment_values_are_strings_where_the_setting_is_a_string() {
    let config = load_str(
        "",
        &[
            ("ETCD_PG_SYNC__ETCD__ENDPOINTS", "http://127.0.0.1:2379"),
            ("ETCD_PG_SYNC__ETCD__USERNAME", "0042"),
            ("ETCD_PG_SYNC__ETCD__PASSWORD", "007"),
            ("ETCD_PG_SYNC__POSTGRES__PASSWORD", "1e3"),
            ("ETCD_PG_SYNC__CLUSTER__NODE_ID", "007"),
            ("ETCD_PG_SYNC__POSTGRES__POOL_SIZE", "12"),
            ("ETCD_PG_SYNC__SYNC__LISTEN_NOTIFY", "false"),
            ("ETCD_PG_SYNC__RETRY__MULTIPLIER", "1.5"),
        ],
    )
    .unwrap();
    assert_eq!(config.etcd.password.as_ref().unwrap().expose(), "007");
    assert_eq!(config.etcd.username.as_deref(), Some("0042"));
    assert_eq!(config.postgres.password.as_ref().unwrap().expose(), "1e3");
    assert_eq!(config.cluster.node_id, "007");
    assert_eq!(config.postgres.pool_size, 12);
    assert!(!config.sync.listen_notify);
    assert!((config.retry.multiplier - 1.5).abs() < f64::EPSILON);
}

#[test]
fn secret_files_readable_by_others_or_empty_are_refused() {
    for mode in [0o644, 0o604, 0o660] {
        let secret = secret_file("pw\n", mode);
        let error = load_str(
            &format!(
                "[postgres]\npassword_file = \"{}\"\n",
                secret.path().display()
            ),
            &[],
        );
        assert_eq!(
            invalid_key(error),
            "postgres.password_file",
            "mode {mode:o}"
        );
    }
    let private = secret_file("pw\n", 0o600);
    let config = load_str(
        &format!(
            "[postgres]\npassword_file = \"{}\"\n",
            private.path().display()
        ),
        &[],
    )
    .unwrap();
    assert_eq!(config.postgres.password.unwrap().expose(), "pw");
    let empty = secret_file("\n", 0o600);
    let error = load_str(
        &format!(
            "[etcd]\nusername = \"u\"\npassword_file = \"{}\"\n",
            empty.path().display()
        ),
        &[],
    );
    assert_eq!(invalid_key(error), "etcd.password_file");
    // Private keys follow the same rule.
    let key = secret_file("-----BEGIN PRIVATE KEY-----\n", 0o644);
    let error = load_str(
        &format!(
            "[etcd]\nendpoints = [\"https://127.0.0.1:2379\"]\n[etcd.tls]\ncert_file = \"/c.pem\"\nkey_file = \"{}\"\n",
            key.path().display()
        ),
        &[],
    );
    assert_eq!(invalid_key(error), "etcd.tls.key_file");
}

#[test]
fn etcd_credentials_over_plain_http_only_to_loopback() {
    let with_user = |endpoints: &str| {
        load_str(
            "",
            &[
                ("ETCD_PG_SYNC__ETCD__ENDPOINTS", endpoints),
                ("ETCD_PG_SYNC__ETCD__USERNAME", "sync"),
                ("ETCD_PG_SYNC__ETCD__PASSWORD", "pw"),
            ],
        )
    };
    assert_eq!(
        invalid_key(with_user("https://etcd-0:2379,http://etcd-1.example:2379")),
        "etcd.endpoints[1]"
    );
    for fine in [
        "http://127.0.0.1:2379",
        "http://localhost:2379",
        "http://[::1]:2379",
        "https://etcd.example:2379",
    ] {
        assert!(with_user(fine).is_ok(), "{fine}");
    }
    // Without credentials, plain http anywhere is the operator's choice.
    assert!(
        load_str(
            "",
            &[("ETCD_PG_SYNC__ETCD__ENDPOINTS", "http://etcd.example:2379")]
        )
        .is_ok()
    );
}

#[test]
fn sslmode_and_certificates_in_the_url_are_honoured_as_libpq_does() {
    let url = |query: &str| {
        load_str(
            &format!("[postgres]\nurl = \"postgres://u@db.example:5432/app?{query}\"\n"),
            &[],
        )
    };
    let config = url(
        "sslmode=verify-full&sslrootcert=/ca.pem&sslcert=/c.pem&sslkey=/k.pem&application_name=x",
    )
    .unwrap();
    assert_eq!(config.postgres.tls.mode, SslMode::VerifyFull);
    assert_eq!(
        config.postgres.tls.ca_file.as_deref(),
        Some(Path::new("/ca.pem"))
    );
    assert_eq!(
        config.postgres.tls.cert_file.as_deref(),
        Some(Path::new("/c.pem"))
    );
    assert_eq!(
        config.postgres.tls.key_file.as_deref(),
        Some(Path::new("/k.pem"))
    );
    assert_eq!(
        config.postgres.url.expose(),
        "postgres://u@db.example:5432/app?application_name=x",
        "the TLS settings move to [postgres.tls]"
    );
    assert_eq!(
        url("sslmode=require").unwrap().postgres.tls.mode,
        SslMode::Require
    );
    assert_eq!(
        url("sslmode=require&sslrootcert=/ca.pem")
            .unwrap()
            .postgres
            .tls
            .mode,
        SslMode::VerifyCa,
        "libpq verifies the CA when a root certificate is given"
    );
    assert_eq!(
        url("sslmode=disable").unwrap().postgres.tls.mode,
        SslMode::Disable
    );
    for silent_fallback in [
        "sslmode=prefer",
        "sslmode=allow",
        "sslmode=bogus",
        "sslcrl=/x",
    ] {
        assert_eq!(
            invalid_key(url(silent_fallback)),
            "postgres.url",
            "{silent_fallback}"
        );
    }
    assert_eq!(
        invalid_key(url("sslmode=verify-full")),
        "postgres.tls.ca_file"
    );
    // The URL and [postgres.tls] disagreeing is an error, not a guess.
    let conflict = load_str(
        "[postgres]\nurl = \"postgres://u@h/db?sslmode=require\"\n[postgres.tls]\nmode = \"verify-full\"\nca_file = \"/ca.pem\"\n",
        &[],
    );
    assert_eq!(invalid_key(conflict), "postgres.url");
}

#[test]
fn a_password_without_server_verification_requires_channel_binding() {
    let config = |url: &str, tls: &str, env: &[(&str, &str)]| {
        load_str(&format!("[postgres]\nurl = \"{url}\"\n{tls}"), env).unwrap()
    };
    let require = "[postgres.tls]\nmode = \"require\"\n";
    let verify = "[postgres.tls]\nmode = \"verify-full\"\nca_file = \"/ca.pem\"\n";
    assert!(
        config("postgres://u:pw@h/db", require, &[])
            .postgres
            .requires_channel_binding()
    );
    assert!(
        config(
            "postgres://u@h/db",
            require,
            &[("ETCD_PG_SYNC__POSTGRES__PASSWORD", "pw")]
        )
        .postgres
        .requires_channel_binding()
    );
    assert!(
        !config("postgres://u@h/db", require, &[])
            .postgres
            .requires_channel_binding()
    );
    assert!(
        !config("postgres://u:pw@h/db", verify, &[])
            .postgres
            .requires_channel_binding()
    );
}
