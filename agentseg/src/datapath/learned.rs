//! AS_LEARNED: the addresses a segment's `fqdns` rules learned from the resolver's answers.
//! The daemon's `dns::learned::LearnedTable` is the truth; this map is its image for the live
//! generation (and, during a switch, the next one).
use agentseg_common::{LearnedKey, LearnedValue, map_names};
use aya::maps::{HashMap as AyaHashMap, MapData};

use super::{Datapath, DatapathError, map_mut, map_ref};

fn err(source: aya::maps::MapError) -> DatapathError {
    DatapathError::Map {
        name: map_names::LEARNED,
        source,
    }
}

impl Datapath {
    /// Every learned entry the kernel holds (an earlier daemon's, on adoption).
    pub fn learned(&self) -> Result<Vec<(LearnedKey, LearnedValue)>, DatapathError> {
        let map: AyaHashMap<&MapData, LearnedKey, LearnedValue> =
            map_ref!(self, AyaHashMap, map_names::LEARNED);
        map.iter().collect::<Result<Vec<_>, _>>().map_err(err)
    }

    /// Write one entry. Fails when the map is full: the caller refuses the answer (the
    /// address must be allowed before the member sees it, or not at all).
    pub fn set_learned(
        &mut self,
        key: LearnedKey,
        value: LearnedValue,
    ) -> Result<(), DatapathError> {
        let mut map: AyaHashMap<&mut MapData, LearnedKey, LearnedValue> =
            map_mut!(self, AyaHashMap, map_names::LEARNED);
        map.insert(key, value, 0).map_err(err)
    }

    pub fn remove_learned(&mut self, key: &LearnedKey) -> Result<(), DatapathError> {
        let mut map: AyaHashMap<&mut MapData, LearnedKey, LearnedValue> =
            map_mut!(self, AyaHashMap, map_names::LEARNED);
        match map.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(err(source)),
        }
    }
}
