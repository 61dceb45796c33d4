//! API keys: revocable credentials for applications that cannot hold a client certificate
//! (a web backend, a log shipper, an Elasticsearch client library).
//!
//! A key is created by an admin, carries a role (client or admin, optionally read-only) and is
//! stored only as the SHA-256 of its secret: the secret is shown once, to whoever created it,
//! and nothing a node keeps (log, index, snapshot) can give it back. The table is part of the
//! replicated state — a key is created or revoked by a log entry ([`KeyChange`]), so every node
//! applies the same changes at the same log position, accepts the same keys, and keeps them
//! across restarts and snapshots (the table is stored in every index commit marker, like the
//! request table). A revocation takes effect on each node as it applies the entry.
//!
//! Secrets are 256 random bits, so one fast hash suffices: there is nothing to brute-force that
//! a slow password hash would protect. Comparisons of digests take the same time whatever the
//! input.
//!
//! This module is pure (no networking, no Raft): the state machine applies changes, the HTTP
//! front door asks [`KeyRing::verify`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use base64::Engine;
use serde::{Deserialize, Serialize};

/// Most keys a cluster holds: every key costs a line in every commit marker.
pub const MAX_KEYS: usize = 10_000;
/// Longest key name, in bytes.
pub const MAX_KEY_NAME_BYTES: usize = 128;
/// Length of a key id (hex characters).
const KEY_ID_HEX_CHARS: usize = 20;
/// Random bytes of a secret.
const SECRET_BYTES: usize = 32;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyRole {
    /// Reads and writes documents, searches (as a client certificate).
    Client,
    /// Everything a client may, plus cluster administration and key management.
    Admin,
}

impl KeyRole {
    pub fn name(self) -> &'static str {
        match self {
            KeyRole::Client => "client",
            KeyRole::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Result<KeyRole, String> {
        match text {
            "client" => Ok(KeyRole::Client),
            "admin" => Ok(KeyRole::Admin),
            other => Err(format!("unknown key role `{other}`; use client or admin")),
        }
    }
}

/// One key as the replicated state holds it: never the secret, only its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    pub id: String,
    pub name: String,
    pub role: KeyRole,
    /// A read-only key may search and get, nothing else.
    pub read_only: bool,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    /// When the creating node made it, seconds since the Unix epoch.
    pub created_unix_seconds: u64,
}

/// What `keys list` shows of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyInfo {
    pub id: String,
    pub name: String,
    pub role: KeyRole,
    pub read_only: bool,
    pub created_unix_seconds: u64,
}

impl From<&ApiKeyRecord> for ApiKeyInfo {
    fn from(record: &ApiKeyRecord) -> Self {
        ApiKeyInfo {
            id: record.id.clone(),
            name: record.name.clone(),
            role: record.role,
            read_only: record.read_only,
            created_unix_seconds: record.created_unix_seconds,
        }
    }
}

/// A change to the key table, carried by a log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyChange {
    Create(ApiKeyRecord),
    Revoke { id: String },
}

/// The keys of the cluster, by id, with the index from digest to id that `Bearer` tokens need.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<ApiKeyRecord>", into = "Vec<ApiKeyRecord>")]
pub struct ApiKeyTable {
    keys: BTreeMap<String, ApiKeyRecord>,
    by_digest: HashMap<String, String>,
}

impl From<Vec<ApiKeyRecord>> for ApiKeyTable {
    fn from(records: Vec<ApiKeyRecord>) -> Self {
        let mut table = ApiKeyTable::default();
        for record in records.into_iter().take(MAX_KEYS) {
            table.by_digest.insert(record.secret_sha256.clone(), record.id.clone());
            table.keys.insert(record.id.clone(), record);
        }
        table
    }
}

impl From<ApiKeyTable> for Vec<ApiKeyRecord> {
    fn from(table: ApiKeyTable) -> Self {
        table.keys.into_values().collect()
    }
}

impl ApiKeyTable {
    /// Applies a change. A refused change (table full, id taken, unknown id) changes nothing and
    /// is refused the same way on every replica.
    pub fn apply(&mut self, change: &KeyChange) -> Result<(), String> {
        match change {
            KeyChange::Create(record) => {
                check_record(record)?;
                if self.keys.len() >= MAX_KEYS {
                    return Err(format!("the cluster holds {MAX_KEYS} keys already; revoke some first"));
                }
                if self.keys.contains_key(&record.id) || self.by_digest.contains_key(&record.secret_sha256) {
                    return Err(format!("key id {} exists already", record.id));
                }
                self.by_digest.insert(record.secret_sha256.clone(), record.id.clone());
                self.keys.insert(record.id.clone(), record.clone());
                Ok(())
            }
            KeyChange::Revoke { id } => match self.keys.remove(id) {
                Some(record) => {
                    self.by_digest.remove(&record.secret_sha256);
                    Ok(())
                }
                None => Err(format!("no key with id {id}")),
            },
        }
    }

    /// The key `id` when `secret` is its secret.
    pub fn verify(&self, id: &str, secret: &str) -> Option<&ApiKeyRecord> {
        let record = self.keys.get(id)?;
        digests_equal(&record.secret_sha256, &secret_digest(secret)).then_some(record)
    }

    /// The key whose secret is `secret` (a `Bearer` token names no id).
    pub fn verify_secret(&self, secret: &str) -> Option<&ApiKeyRecord> {
        let id = self.by_digest.get(&secret_digest(secret))?;
        self.keys.get(id)
    }

    pub fn list(&self) -> Vec<ApiKeyInfo> {
        self.keys.values().map(ApiKeyInfo::from).collect()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The key table as the node's front doors see it: replaced whole whenever an applied entry
/// changes it, so a check never waits for the state machine (which may be applying a large
/// batch) and always sees one consistent table.
#[derive(Debug, Default)]
pub struct KeyRing {
    current: RwLock<Arc<ApiKeyTable>>,
}

impl KeyRing {
    pub fn publish(&self, table: ApiKeyTable) {
        *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(table);
    }

    pub fn current(&self) -> Arc<ApiKeyTable> {
        self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}

/// A new key: its record (for the log) and its secret (for the caller, once).
pub fn new_key(name: &str, role: KeyRole, read_only: bool) -> Result<(ApiKeyRecord, String), String> {
    check_key_name(name)?;
    let id_bytes: [u8; KEY_ID_HEX_CHARS / 2] = rand::random();
    let id: String = id_bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    let secret_bytes: [u8; SECRET_BYTES] = rand::random();
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret_bytes);
    let created_unix_seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0);
    let record = ApiKeyRecord {
        id,
        name: name.to_string(),
        role,
        read_only,
        secret_sha256: secret_digest(&secret),
        created_unix_seconds,
    };
    Ok((record, secret))
}

/// What `Authorization: ApiKey …` carries, as Elasticsearch encodes it: base64 of `id:secret`.
pub fn encode_api_key(id: &str, secret: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
}

/// A record as `new_key` makes it: a valid name, a 20-digit and a 64-digit lowercase hex id and
/// digest (a digest of another form could never match a secret).
pub fn check_record(record: &ApiKeyRecord) -> Result<(), String> {
    check_key_name(&record.name)?;
    let hex = |text: &str, length: usize| {
        text.len() == length && text.bytes().all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
    };
    if !hex(&record.id, KEY_ID_HEX_CHARS) {
        return Err(format!("the id must be {KEY_ID_HEX_CHARS} lowercase hex digits"));
    }
    if !hex(&record.secret_sha256, 64) {
        return Err("the digest must be 64 lowercase hex digits (SHA-256)".to_string());
    }
    Ok(())
}

pub fn check_key_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_KEY_NAME_BYTES {
        return Err(format!("a key name has 1 to {MAX_KEY_NAME_BYTES} bytes"));
    }
    if !name.chars().all(|character| character.is_ascii_alphanumeric() || "-_.".contains(character)) {
        return Err(format!("key name `{name}` may hold only letters, digits, `-`, `_` and `.`"));
    }
    Ok(())
}

/// A credential as an `Authorization` header gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// `ApiKey base64(id:secret)`.
    IdAndSecret { id: String, secret: String },
    /// `Bearer <secret>`.
    Secret(String),
}

/// Longest `Authorization` value looked at.
const MAX_AUTHORIZATION_BYTES: usize = 512;

/// Reads an `Authorization` header value; the error says what is wrong with it.
pub fn parse_authorization(value: &str) -> Result<Credential, String> {
    if value.len() > MAX_AUTHORIZATION_BYTES {
        return Err(format!("the Authorization header is over {MAX_AUTHORIZATION_BYTES} bytes"));
    }
    let (scheme, rest) = value.trim().split_once(' ').ok_or("the Authorization header has no scheme")?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("apikey") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .map_err(|_| "the ApiKey credential is not base64 of `id:key`".to_string())?;
        let text = String::from_utf8(decoded).map_err(|_| "the ApiKey credential is not UTF-8".to_string())?;
        let (id, secret) = text.split_once(':').ok_or("the ApiKey credential is not base64 of `id:key`")?;
        return Ok(Credential::IdAndSecret { id: id.to_string(), secret: secret.to_string() });
    }
    if scheme.eq_ignore_ascii_case("bearer") {
        return Ok(Credential::Secret(rest.to_string()));
    }
    Err(format!("unsupported authorization scheme `{scheme}`; use `ApiKey base64(id:key)`, `Bearer <key>` or a client certificate"))
}

fn secret_digest(secret: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    digest.as_ref().iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Equal digests, in a time that does not depend on where they differ.
fn digests_equal(left: &str, right: &str) -> bool {
    left.len() == right.len() && left.bytes().zip(right.bytes()).fold(0_u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_verifies_only_with_its_secret_and_not_after_revocation() {
        let mut table = ApiKeyTable::default();
        let (record, secret) = new_key("web", KeyRole::Client, false).unwrap();
        assert!(!record.secret_sha256.contains(&secret));
        table.apply(&KeyChange::Create(record.clone())).unwrap();
        assert_eq!(table.verify(&record.id, &secret).map(|key| &key.name), Some(&"web".to_string()));
        assert!(table.verify(&record.id, "wrong").is_none());
        assert!(table.verify("other", &secret).is_none());
        assert_eq!(table.verify_secret(&secret).map(|key| key.id.clone()), Some(record.id.clone()));
        // The table survives its serialization (commit markers, snapshots).
        let restored: ApiKeyTable = serde_json::from_str(&serde_json::to_string(&table).unwrap()).unwrap();
        assert_eq!(restored, table);
        assert!(restored.verify_secret(&secret).is_some());
        table.apply(&KeyChange::Revoke { id: record.id.clone() }).unwrap();
        assert!(table.verify(&record.id, &secret).is_none());
        assert!(table.verify_secret(&secret).is_none());
        assert!(table.apply(&KeyChange::Revoke { id: record.id.clone() }).unwrap_err().contains("no key"));
        assert!(table.apply(&KeyChange::Create(record.clone())).is_ok());
        assert!(table.apply(&KeyChange::Create(record.clone())).unwrap_err().contains("exists"));
        // A record not made by `new_key` (from a hostile member's proposal, say) is refused.
        let mut upper = record.clone();
        upper.id = "ABCDEF0123456789ABCD".into();
        assert!(table.apply(&KeyChange::Create(upper)).unwrap_err().contains("lowercase"));
        let mut short = record;
        short.secret_sha256 = "00".into();
        assert!(table.apply(&KeyChange::Create(short)).unwrap_err().contains("digest"));
    }

    #[test]
    fn authorization_headers_from_a_table() {
        let encoded = encode_api_key("abc", "s3cret");
        let cases: [(&str, Result<Credential, &str>); 7] = [
            (&format!("ApiKey {encoded}"), Ok(Credential::IdAndSecret { id: "abc".into(), secret: "s3cret".into() })),
            (&format!("apikey  {encoded} "), Ok(Credential::IdAndSecret { id: "abc".into(), secret: "s3cret".into() })),
            ("Bearer tok", Ok(Credential::Secret("tok".into()))),
            ("Basic dXNlcjpwYXNz", Err("unsupported authorization scheme")),
            ("ApiKey !!!", Err("not base64")),
            ("ApiKey YWJj", Err("not base64 of `id:key`")),
            ("ApiKey", Err("no scheme")),
        ];
        for (header, expected) in cases {
            match (parse_authorization(header), expected) {
                (Ok(found), Ok(expected)) => assert_eq!(found, expected, "{header}"),
                (Err(found), Err(expected)) => assert!(found.contains(expected), "{header}: {found}"),
                (found, expected) => panic!("{header}: {found:?} vs {expected:?}"),
            }
        }
        assert!(parse_authorization(&"x".repeat(1000)).is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(check_key_name("web-1.prod_a").is_ok());
        for bad in ["", "a b", "é", &"x".repeat(200)] {
            assert!(check_key_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_table_is_bounded() {
        let mut table = ApiKeyTable::default();
        for number in 0..MAX_KEYS {
            let record = ApiKeyRecord {
                id: format!("{number:020}"),
                name: "k".into(),
                role: KeyRole::Client,
                read_only: true,
                secret_sha256: format!("{number:064}"),
                created_unix_seconds: 0,
            };
            table.apply(&KeyChange::Create(record)).unwrap();
        }
        let (record, _) = new_key("one-more", KeyRole::Admin, false).unwrap();
        assert!(table.apply(&KeyChange::Create(record)).unwrap_err().contains("revoke some"));
    }
}
