//! What survives a restart besides the pins: which generation the last switch made live, at
//! which epoch, from which policy (a digest). A restarted daemon with the same policy adopts
//! the live generation as it is; anything that does not match (another policy, another build,
//! a switch made after the record, a quarantine set that changed) gets a full switch.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::engine::Engine;
use crate::compile::Compiled;

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct LiveRecord {
    pin_root: String,
    generation: u32,
    epoch: u32,
    digest: String,
}

impl Engine {
    /// The digest a switch to `compiled` records: the policy's kernel-visible contents, the
    /// quarantined segments (their flag is written with the policy), the build's kernel
    /// objects and the pin root.
    pub(super) fn generation_digest(&self, compiled: &Compiled) -> String {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(compiled.digest());
        h.update(crate::datapath::objects_digest());
        for name in self.quarantined_segments() {
            h.update(name.as_bytes());
            h.update([0]);
        }
        h.update(self.dp.pin_dirs().root.as_os_str().as_encoded_bytes());
        hex::encode(h.finalize())
    }

    /// After a switch (or an adoption), and when the epoch moves: the record, replaced
    /// atomically, 0600. Not synced: pins do not outlive a reboot, the page cache does not
    /// lose it otherwise. A failure only costs the next restart a full write.
    pub(super) fn record_live(&mut self, generation: u32, epoch: u32, digest: &str) {
        self.live_digest = Some(digest.to_owned());
        let record = LiveRecord {
            pin_root: self.dp.pin_dirs().root.display().to_string(),
            generation,
            epoch,
            digest: digest.to_owned(),
        };
        let path = &self.generation_record;
        let tmp = path.with_extension("json.tmp");
        let result = (|| -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&serde_json::to_vec(&record).unwrap_or_default())?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = result {
            warn!(path = %path.display(), "recording the live generation: {e}");
        }
    }

    /// Whether the pins this daemon adopted hold `compiled` live: the record names the
    /// generation and epoch the kernel's CONFIG shows, and the same digest. Removed before the
    /// answer is used, so that a crash in what follows can never leave a stale record.
    pub(super) fn live_record(&self, compiled: &Compiled) -> bool {
        // A map created empty (its pin was removed) holds nothing of the recorded policy.
        if !self.dp.adopted_whole() {
            return false;
        }
        let Ok(bytes) = std::fs::read(&self.generation_record) else {
            return false;
        };
        let _ = std::fs::remove_file(&self.generation_record);
        let Ok(record) = serde_json::from_slice::<LiveRecord>(&bytes) else {
            warn!(path = %self.generation_record.display(), "unreadable generation record ignored");
            return false;
        };
        let Ok(config) = self.dp.config() else {
            return false;
        };
        let same = record.pin_root == self.dp.pin_dirs().root.display().to_string()
            && record.generation == config.active_gen & 1
            && record.epoch == config.epoch
            && record.digest == self.generation_digest(compiled);
        debug!(
            ?record,
            active_gen = config.active_gen,
            epoch = config.epoch,
            same,
            "generation record"
        );
        same
    }

    /// Copy the live policy into the inactive half (cleared first when its contents are
    /// unknown), so that the next switch writes only a difference. Run once the daemon is
    /// ready; on failure the next switch clears and writes the half in full, as before.
    pub(super) fn prepare_inactive(&mut self) {
        if self.inactive_policy.is_some() {
            return;
        }
        let Some(live) = self.compiled.clone() else {
            return;
        };
        let started = std::time::Instant::now();
        let next = 1 - self.generation;
        let quarantined = self.quarantined_segments();
        let clean = std::mem::replace(&mut self.inactive_clean, false);
        let result = if clean {
            self.dp.write_generation(next, &live, &quarantined, None)
        } else {
            self.dp.rewrite_generation(next, &live, &quarantined)
        };
        match result {
            Ok(stats) => {
                self.inactive_policy = Some(live);
                debug!(
                    ms = started.elapsed().as_millis() as u64,
                    written = stats.written,
                    deleted = stats.deleted,
                    "inactive generation prepared"
                );
            }
            Err(e) => warn!("preparing the inactive generation: {e:#}"),
        }
    }
}
