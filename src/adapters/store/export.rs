//! A copy of the whole store into a fresh sled directory, for `state backup`.

use std::path::Path;

use super::commit::sync_files;
use super::{Store, StoreError};

impl Store {
    /// Copies every tree into a fresh store at `dest` (sled export/import) and syncs it, for
    /// `state backup`. Multi-tree writes (enqueue, state changes) wait while it copies, so the
    /// copy is one consistent state: never an envelope without its queue key or index entry.
    pub fn export_to(&self, dest: &Path) -> Result<(), StoreError> {
        let copy = sled::Config::new().path(dest).open()?;
        let gate = self.inner.gate.write().map_err(|_| StoreError::Closed)?;
        copy.import(self.inner._db.export());
        drop(gate);
        copy.flush()?;
        drop(copy);
        sync_files(dest)
    }
}
