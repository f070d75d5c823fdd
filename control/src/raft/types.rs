//! The openraft type configuration and the versioned postcard codec every stored or sent value uses.
//!
//! Nothing here leaves the `raft` module: other crates see [`crate::state`] types only.
//! Invariant: every byte string this crate writes to disk starts with [`FORMAT_VERSION`], so a
//! later release can recognise (and migrate or refuse) what an earlier one wrote.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::state::{Command, CommandError, CommandOutcome};

openraft::declare_raft_types!(
    /// Vessel's Raft types: commands are the log's application data; nodes are known by their
    /// gRPC address.
    pub TypeConfig:
        D = Command,
        R = ApplyResult,
        NodeId = u64,
        Node = openraft::BasicNode,
);

/// What applying one log entry produced: the command's verdict for normal entries, `None` for
/// blank and membership entries.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ApplyResult(pub Option<Result<CommandOutcome, CommandError>>);

pub type Raft = openraft::Raft<TypeConfig, super::store::StateMachine>;
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, Vec<u8>>;

/// Version byte in front of every postcard value this crate stores.
pub const FORMAT_VERSION: u8 = 1;

/// Why stored bytes could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("the value is empty (no format version byte)")]
    Empty,
    #[error(
        "format version {found} is not known to this Vessel (it reads version {FORMAT_VERSION}); upgrade Vessel"
    )]
    UnknownVersion { found: u8 },
    #[error("malformed value: {0}")]
    Malformed(#[from] postcard::Error),
}

/// Encodes `value` as `[FORMAT_VERSION, postcard...]`.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_extend(value, vec![FORMAT_VERSION])
}

/// Decodes what [`encode`] wrote, refusing unknown versions and trailing garbage.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(DecodeError::UnknownVersion { found: version });
    }
    let (value, rest) = postcard::take_from_bytes(body)?;
    if !rest.is_empty() {
        return Err(DecodeError::Malformed(
            postcard::Error::DeserializeBadEncoding,
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_round_trips_and_refuses_what_it_did_not_write() {
        let value = (7u64, "volume".to_owned(), Some(vec![1u8, 2, 3]));
        let bytes = encode(&value).unwrap();
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(
            decode::<(u64, String, Option<Vec<u8>>)>(&bytes).unwrap(),
            value
        );

        assert!(matches!(decode::<u64>(&[]), Err(DecodeError::Empty)));
        let mut future = bytes.clone();
        future[0] = 9;
        let error = decode::<(u64, String, Option<Vec<u8>>)>(&future).unwrap_err();
        assert_eq!(
            error.to_string(),
            "format version 9 is not known to this Vessel (it reads version 1); upgrade Vessel"
        );
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(
            decode::<(u64, String, Option<Vec<u8>>)>(&trailing),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode::<(u64, String, Option<Vec<u8>>)>(&bytes[..4]),
            Err(DecodeError::Malformed(_))
        ));
    }
}
