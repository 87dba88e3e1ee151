//! Training of the image classifier behind the `trainer` CLI: data loading ([`data`]), the
//! training loop and the drivers that write a model directory ([`train`]), fine-tuning a
//! served model on a folder of photos ([`finetune`], on the features [`features`]
//! computes and caches), per-class evaluation ([`evaluate`]), `trainer bench`
//! ([`bench`](mod@bench)), and the command line with one function per command ([`cli`]).
//! The model format, the network and inference live in the `classifier-inference`
//! crate, which this one writes models for.

pub mod bench;
pub mod cli;
pub mod data;
pub mod evaluate;
pub mod features;
pub mod finetune;
pub mod train;
