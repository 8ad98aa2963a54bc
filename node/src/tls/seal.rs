//! Encryption at rest for private keys (ChaCha20-Poly1305).
//!
//! The data key comes from `CHARON_ENCRYPTION_KEY` (64 hex characters) or
//! from `<data-dir>/encryption.key`, created on first start with mode 0600.
//! A copy of the redb file alone therefore never reveals a private key.
//! Each sealed value records the key's id, so a node started with the wrong
//! key says so instead of failing with an opaque decryption error.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use sha2::{Digest, Sha256};

pub const KEY_FILE: &str = "encryption.key";

pub struct DataKey {
    key: LessSafeKey,
    id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("cannot read or create the encryption key file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: must be 64 hex characters (32 bytes)")]
    BadKey(String),
    #[error("sealed with data key {sealed_with}, but this node has key {ours} (wrong CHARON_ENCRYPTION_KEY or encryption.key?)")]
    WrongKey { sealed_with: String, ours: String },
    #[error("sealed value is corrupt or was tampered with")]
    Corrupt,
}

fn parse_hex_key(what: &str, text: &str) -> Result<[u8; 32], SealError> {
    let bytes = hex::decode(text.trim()).map_err(|_| SealError::BadKey(what.to_string()))?;
    bytes
        .try_into()
        .map_err(|_| SealError::BadKey(what.to_string()))
}

impl DataKey {
    pub fn from_bytes(bytes: [u8; 32]) -> DataKey {
        let id = hex::encode(&Sha256::digest(bytes)[..8]);
        let key =
            LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &bytes).expect("32-byte key"));
        DataKey { key, id }
    }

    /// `env_key` (hex) if given, else the key file, else a new key file.
    pub fn load_or_create(data_dir: &Path, env_key: Option<&str>) -> Result<DataKey, SealError> {
        if let Some(k) = env_key {
            return Ok(DataKey::from_bytes(parse_hex_key(
                "CHARON_ENCRYPTION_KEY",
                k,
            )?));
        }
        let path = data_dir.join(KEY_FILE);
        let io = |source| SealError::Io {
            path: path.clone(),
            source,
        };
        match fs::read_to_string(&path) {
            Ok(text) => Ok(DataKey::from_bytes(parse_hex_key(
                &path.display().to_string(),
                &text,
            )?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let bytes: [u8; 32] = rand::random();
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(io)?;
                f.write_all(format!("{}\n", hex::encode(bytes)).as_bytes())
                    .map_err(io)?;
                f.sync_all().map_err(io)?;
                tracing::info!(path = %path.display(), "generated the data key that encrypts private keys at rest; back it up with the data dir");
                Ok(DataKey::from_bytes(bytes))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The data key every member of a cluster derives from the cluster
    /// secret, so that certificates sealed on one node open on all of them
    /// without a key file to copy around. Used when neither
    /// `CHARON_ENCRYPTION_KEY` nor a key file is there.
    pub fn from_cluster_secret(secret: &str) -> DataKey {
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        let tag = ring::hmac::sign(&k, b"charon data key v1");
        DataKey::from_bytes(tag.as_ref().try_into().expect("32-byte HMAC-SHA256"))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Returns (nonce, ciphertext with tag). `aad` binds the value to its
    /// record (the certificate id), so sealed keys cannot be swapped.
    pub fn seal(&self, plaintext: &[u8], aad: &str) -> (Vec<u8>, Vec<u8>) {
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let mut buf = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(aad.as_bytes()),
                &mut buf,
            )
            .expect("in-memory seal cannot fail");
        (nonce_bytes.to_vec(), buf)
    }

    pub fn open(
        &self,
        key_id: &str,
        nonce: &[u8],
        sealed: &[u8],
        aad: &str,
    ) -> Result<Vec<u8>, SealError> {
        if key_id != self.id {
            return Err(SealError::WrongKey {
                sealed_with: key_id.to_string(),
                ours: self.id.clone(),
            });
        }
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| SealError::Corrupt)?;
        let mut buf = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut buf,
            )
            .map_err(|_| SealError::Corrupt)?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn seals_and_opens_and_detects_tampering_and_wrong_keys() {
        let dir = tempfile::tempdir().unwrap();
        let k = DataKey::load_or_create(dir.path(), None).unwrap();
        let meta = fs::metadata(dir.path().join(KEY_FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let (nonce, sealed) = k.seal(b"secret key", "cert/1");
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(
            k.open(k.id(), &nonce, &sealed, "cert/1").unwrap(),
            b"secret key"
        );
        assert!(matches!(
            k.open(k.id(), &nonce, &sealed, "cert/2"),
            Err(SealError::Corrupt)
        ));
        let mut bad = sealed.clone();
        bad[0] ^= 1;
        assert!(matches!(
            k.open(k.id(), &nonce, &bad, "cert/1"),
            Err(SealError::Corrupt)
        ));
        let again = DataKey::load_or_create(dir.path(), None).unwrap();
        assert_eq!(again.id(), k.id(), "the key file is reused");
        let other = DataKey::load_or_create(dir.path(), Some(&"ab".repeat(32))).unwrap();
        assert!(matches!(
            other.open(k.id(), &nonce, &sealed, "cert/1"),
            Err(SealError::WrongKey { .. })
        ));
        assert!(DataKey::load_or_create(dir.path(), Some("abc")).is_err());
    }
}
