//! What the gateway knows of the servers' models, learned over the broker.
//!
//! The gateway loads no model. The wire contract has no metadata request, so it asks the
//! servers the way any client can: it sends a small blank image to the model (a
//! *probe*) with `top_k` above any class count, and the reply names the model, its
//! version and every class with its index. A model the servers do not serve is answered
//! `UNKNOWN_MODEL` (404 here); no answer within the deadline means no server is up for
//! it (the model is not ready). What was learned is kept for `model_info_ttl_secs`, and
//! dropped at once when an inference reply reports another version (a server reloaded
//! its model), so metadata follows hot reloads.
//!
//! The model list (`GET /v2/models`) is what the gateway knows: the servers' default
//! model, the names in `gateway.models`, and every name asked for and found.

use std::collections::{BTreeSet, HashMap};
use std::io::Cursor;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use classifier_app::lock;
use classifier_proto::{ErrorCode, Outcome, Prediction};
use tokio::time::Instant;

use crate::dispatch::{DispatchError, Dispatcher, ImageRequest};

/// `top_k` of a probe: more than any classifier has classes, so the reply lists them all.
const PROBE_TOP_K: u32 = 1_000_000;

/// Most classes a model may have here: a reply naming a higher class index is not
/// believed (the index sets how much is allocated).
pub const MAX_CLASSES: usize = 100_000;

/// Side of the blank probe image, in pixels.
const PROBE_SIDE: u32 = 32;

/// A model as the servers describe it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    /// The name it is served under.
    pub name: String,
    /// Its version (from its metadata).
    pub version: String,
    /// Class names by class index.
    pub class_names: Vec<String>,
}

impl ModelInfo {
    /// The model a reply listing every class describes.
    fn from_predictions(name: &str, version: &str, predictions: &[Prediction]) -> ModelInfo {
        let count = predictions
            .iter()
            .map(|p| p.class_index as usize + 1)
            .filter(|&count| count <= MAX_CLASSES)
            .max()
            .unwrap_or(0);
        let mut class_names: Vec<String> = (0..count).map(|i| format!("class {i}")).collect();
        for prediction in predictions {
            if let Some(name) = class_names.get_mut(prediction.class_index as usize) {
                name.clone_from(&prediction.class_name);
            }
        }
        ModelInfo {
            name: name.to_string(),
            version: version.to_string(),
            class_names,
        }
    }
}

/// Why a model could not be described.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The servers serve no model of that name.
    #[error("{0}")]
    Unknown(String),
    /// No server answered, or the answer was an error.
    #[error("the model is not available: {0}")]
    Unavailable(String),
}

struct Entry {
    info: Arc<ModelInfo>,
    learned: Instant,
}

/// The models the gateway has learned of.
pub struct Catalog {
    /// By the name asked for ("" is the servers' default model).
    entries: Mutex<HashMap<String, Entry>>,
    /// Every name found to be served, and the configured ones.
    names: Mutex<BTreeSet<String>>,
    ttl: Duration,
    probe: Vec<u8>,
}

impl Catalog {
    /// A catalog that lists `configured` names and keeps what it learns for `ttl`.
    pub fn new(configured: &[String], ttl: Duration) -> anyhow::Result<Catalog> {
        Ok(Catalog {
            entries: Mutex::new(HashMap::new()),
            names: Mutex::new(configured.iter().cloned().collect()),
            ttl,
            probe: blank_png(PROBE_SIDE)?,
        })
    }

    /// Every model name known: the default model's, the configured ones, those found.
    pub fn names(&self) -> Vec<String> {
        lock(&self.names).iter().cloned().collect()
    }

    /// The model `name` (empty: the servers' default), from what was learned recently
    /// or by asking the servers, waiting at most until `deadline`.
    pub async fn describe(
        &self,
        dispatcher: &Dispatcher,
        name: &str,
        deadline: Instant,
    ) -> Result<Arc<ModelInfo>, CatalogError> {
        if let Some(entry) = lock(&self.entries).get(name) {
            if entry.learned.elapsed() < self.ttl {
                return Ok(Arc::clone(&entry.info));
            }
        }
        let info = Arc::new(self.probe(dispatcher, name, deadline).await?);
        let learned = Instant::now();
        let mut entries = lock(&self.entries);
        for key in [name, info.name.as_str()] {
            let info = Arc::clone(&info);
            entries.insert(key.to_string(), Entry { info, learned });
        }
        lock(&self.names).insert(info.name.clone());
        Ok(info)
    }

    /// A reply of model `name` reported `version`: what was learned of another version
    /// is dropped (the servers reloaded it), so the next look asks again.
    pub fn observe(&self, name: &str, version: &str) {
        lock(&self.entries)
            .retain(|_, entry| entry.info.name != name || entry.info.version == version);
    }

    /// Asks the servers about `name` with the blank probe image.
    async fn probe(
        &self,
        dispatcher: &Dispatcher,
        name: &str,
        deadline: Instant,
    ) -> Result<ModelInfo, CatalogError> {
        let request = ImageRequest {
            image: self.probe.clone(),
            model_name: name.to_string(),
            top_k: PROBE_TOP_K,
            trace: None,
        };
        let reply = match dispatcher.classify(vec![request], deadline).await {
            Ok(mut replies) => replies.pop(),
            Err(DispatchError::DeadlineExceeded) => {
                return Err(CatalogError::Unavailable(
                    "no server answered in time".to_string(),
                ))
            }
            Err(error) => return Err(CatalogError::Unavailable(error.to_string())),
        };
        match reply.and_then(|reply| reply.outcome) {
            Some(Outcome::Predictions(predictions)) => Ok(ModelInfo::from_predictions(
                &predictions.model_name,
                &predictions.model_version,
                &predictions.top_k,
            )),
            Some(Outcome::Error(error)) if error.code == ErrorCode::UnknownModel as i32 => {
                Err(CatalogError::Unknown(error.reason))
            }
            Some(Outcome::Error(error)) => Err(CatalogError::Unavailable(error.reason)),
            None => Err(CatalogError::Unavailable(
                "the servers' reply holds no outcome".to_string(),
            )),
        }
    }
}

/// A mid-grey PNG, `side` pixels square: an image every model can take.
fn blank_png(side: u32) -> anyhow::Result<Vec<u8>> {
    let image = image::GrayImage::from_pixel(side, side, image::Luma([128]));
    let mut bytes = Cursor::new(Vec::new());
    image.write_to(&mut bytes, image::ImageFormat::Png)?;
    Ok(bytes.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prediction(class_name: &str, class_index: u32, probability: f32) -> Prediction {
        Prediction {
            class_name: class_name.to_string(),
            class_index,
            probability,
        }
    }

    #[test]
    fn a_probe_reply_gives_every_class_by_index() {
        let info = ModelInfo::from_predictions(
            "fashion",
            "3",
            &[
                prediction("Bag", 2, 0.7),
                prediction("Coat", 0, 0.2),
                prediction("Shirt", 1, 0.1),
            ],
        );
        assert_eq!(info.class_names, vec!["Coat", "Shirt", "Bag"]);
        assert_eq!(
            (info.name.as_str(), info.version.as_str()),
            ("fashion", "3")
        );
    }

    #[test]
    fn a_reply_missing_an_index_names_it_by_number() {
        let info = ModelInfo::from_predictions("m", "1", &[prediction("b", 1, 1.0)]);
        assert_eq!(info.class_names, vec!["class 0", "b"]);
    }

    #[test]
    fn another_version_drops_what_was_learned() {
        let catalog =
            Catalog::new(&["extra".to_string()], Duration::from_secs(60)).expect("catalog");
        let info = Arc::new(ModelInfo::from_predictions(
            "m",
            "1",
            &[prediction("a", 0, 1.0)],
        ));
        lock(&catalog.entries).insert(
            String::new(),
            Entry {
                info,
                learned: Instant::now(),
            },
        );
        catalog.observe("m", "1");
        assert_eq!(lock(&catalog.entries).len(), 1, "same version kept");
        catalog.observe("m", "2");
        assert!(lock(&catalog.entries).is_empty(), "another version dropped");
        assert_eq!(catalog.names(), vec!["extra"]);
    }

    #[test]
    fn the_probe_is_a_png() {
        let png = blank_png(PROBE_SIDE).expect("png");
        let decoded = image::load_from_memory(&png).expect("decodes");
        assert_eq!(
            (decoded.width(), decoded.height()),
            (PROBE_SIDE, PROBE_SIDE)
        );
    }
}
