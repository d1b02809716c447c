//! A copy of the whole store into a fresh sled directory, for `state backup`.

use std::path::Path;

use super::commit::sync_files;
use super::{Store, StoreError};

impl Store {
    /// Copies every tree into a fresh store at `dest` (sled export/import) and syncs it, for
    /// `state backup`. Each tree is copied as it stands when it is reached.
    pub fn export_to(&self, dest: &Path) -> Result<(), StoreError> {
        let copy = sled::Config::new().path(dest).open()?;
        copy.import(self.inner._db.export());
        copy.flush()?;
        drop(copy);
        sync_files(dest)
    }
}
