//! Dataset loading: Fashion-MNIST idx files (raw or gzip) and folders of class folders.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use classifier_inference::{Normalization, Preprocessor};

/// Fashion-MNIST display names, in label order.
pub const FASHION_MNIST_CLASS_NAMES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Fashion-MNIST folder names (filesystem safe), in label order.
pub const FASHION_MNIST_CLASS_DIRS: [&str; 10] = [
    "t-shirt-top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
];

/// Errors specific to the idx file format, so callers can tell bad data from I/O problems.
#[derive(Debug, thiserror::Error)]
pub enum IdxError {
    /// The file does not start with a valid idx magic number.
    #[error("bad idx magic {0:#010x}")]
    BadMagic(u32),
    /// The element type is not unsigned bytes (the only type Fashion-MNIST uses).
    #[error("unsupported idx element type {0:#04x} (only u8 is supported)")]
    UnsupportedType(u8),
    /// The header promises more data than the file holds.
    #[error("idx data too short: header says {expected} bytes, file has {actual}")]
    Truncated {
        /// Bytes announced by the header.
        expected: usize,
        /// Bytes present.
        actual: usize,
    },
    /// Dimensions differ from what the caller needs (e.g. images must be 3-D).
    #[error("unexpected idx dimensions {0:?}")]
    BadDims(Vec<usize>),
}

/// A decoded idx file: its dimensions and its u8 payload (row-major).
#[derive(Clone, Debug)]
pub struct Idx {
    /// Dimensions, outermost first (e.g. `[n, rows, cols]`).
    pub dims: Vec<usize>,
    /// The data, `dims.product()` bytes.
    pub data: Vec<u8>,
}

/// Parses an idx byte buffer (already decompressed).
pub fn parse_idx(bytes: &[u8]) -> Result<Idx, IdxError> {
    if bytes.len() < 4 {
        return Err(IdxError::Truncated {
            expected: 4,
            actual: bytes.len(),
        });
    }
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if bytes[0] != 0 || bytes[1] != 0 || bytes[3] == 0 {
        return Err(IdxError::BadMagic(magic));
    }
    if bytes[2] != 0x08 {
        return Err(IdxError::UnsupportedType(bytes[2]));
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(IdxError::Truncated {
            expected: header,
            actual: bytes.len(),
        });
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let len = dims
        .iter()
        .try_fold(1usize, |a, d| a.checked_mul(*d))
        .ok_or_else(|| IdxError::BadDims(dims.clone()))?;
    let expected = header + len;
    if bytes.len() < expected {
        return Err(IdxError::Truncated {
            expected,
            actual: bytes.len(),
        });
    }
    Ok(Idx {
        dims,
        data: bytes[header..expected].to_vec(),
    })
}

/// Reads an idx file, transparently gunzipping it when it starts with the gzip magic.
pub fn read_idx(path: &Path) -> anyhow::Result<Idx> {
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .with_context(|| format!("gunzipping {}", path.display()))?;
        out
    } else {
        raw
    };
    parse_idx(&bytes).with_context(|| format!("parsing {}", path.display()))
}

/// Finds `base` or `base.gz` in `dir`.
fn find_idx_file(dir: &Path, base: &str) -> anyhow::Result<PathBuf> {
    for name in [base.to_string(), format!("{base}.gz")] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("neither {base} nor {base}.gz found in {}", dir.display())
}

/// One split of an idx dataset: 8-bit grayscale images and their labels.
#[derive(Clone, Debug)]
pub struct IdxSplit {
    /// Number of images.
    pub n: usize,
    /// Image height.
    pub rows: usize,
    /// Image width.
    pub cols: usize,
    /// `n * rows * cols` pixels, row-major per image.
    pub pixels: Vec<u8>,
    /// `n` labels.
    pub labels: Vec<u8>,
}

impl IdxSplit {
    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let len = self.rows * self.cols;
        &self.pixels[i * len..(i + 1) * len]
    }

    /// Image `i` as an `image` crate grayscale image (for export and preprocessing checks).
    pub fn gray_image(&self, i: usize) -> image::GrayImage {
        image::GrayImage::from_raw(self.cols as u32, self.rows as u32, self.image(i).to_vec())
            .expect("buffer length matches dimensions by construction")
    }

    /// Converts to a float dataset, scaling to `[0, 1]` and normalising with `norm`.
    pub fn to_dataset(&self, norm: &Normalization) -> Dataset {
        let mean = norm.mean.first().copied().unwrap_or(0.0);
        let inv = 1.0 / norm.std.first().copied().unwrap_or(1.0);
        Dataset {
            images: self
                .pixels
                .iter()
                .map(|&p| (p as f32 / 255.0 - mean) * inv)
                .collect(),
            labels: self.labels.iter().map(|&l| l as u32).collect(),
            channels: 1,
            height: self.rows,
            width: self.cols,
        }
    }
}

/// Loads one images+labels pair of idx files from `dir`.
fn load_split(dir: &Path, images: &str, labels: &str) -> anyhow::Result<IdxSplit> {
    let img = read_idx(&find_idx_file(dir, images)?)?;
    let lab = read_idx(&find_idx_file(dir, labels)?)?;
    let (n, rows, cols) = match img.dims[..] {
        [n, r, c] => (n, r, c),
        _ => return Err(IdxError::BadDims(img.dims).into()),
    };
    if lab.dims != [n] {
        bail!(
            "{labels}: expected {n} labels to match {images}, got dims {:?}",
            lab.dims
        );
    }
    Ok(IdxSplit {
        n,
        rows,
        cols,
        pixels: img.data,
        labels: lab.data,
    })
}

/// Fashion-MNIST (or any MNIST-format dataset): train and test splits.
#[derive(Clone, Debug)]
pub struct FashionMnist {
    /// The 60,000 training images.
    pub train: IdxSplit,
    /// The 10,000 test images.
    pub test: IdxSplit,
}

/// Loads Fashion-MNIST from a directory with the four standard idx files, `.gz` or raw.
pub fn load_fashion_mnist(dir: &Path) -> anyhow::Result<FashionMnist> {
    let train = load_split(dir, "train-images-idx3-ubyte", "train-labels-idx1-ubyte")?;
    let test = load_split(dir, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")?;
    if (train.rows, train.cols) != (test.rows, test.cols) {
        bail!("train and test images differ in size");
    }
    Ok(FashionMnist { train, test })
}

/// Per-channel mean and std of 8-bit pixels scaled to `[0, 1]` (single channel).
pub fn gray_normalization(pixels: &[u8]) -> Normalization {
    let n = pixels.len().max(1) as f64;
    let sum: f64 = pixels.iter().map(|&p| p as f64 / 255.0).sum();
    let mean = sum / n;
    let var: f64 = pixels
        .iter()
        .map(|&p| (p as f64 / 255.0 - mean).powi(2))
        .sum::<f64>()
        / n;
    Normalization {
        mean: vec![mean as f32],
        std: vec![(var.sqrt() as f32).max(1e-6)],
    }
}

/// Preprocessed images (CHW f32 each, concatenated) with labels: what training consumes.
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    /// `len() * channels * height * width` floats.
    pub images: Vec<f32>,
    /// One label per image.
    pub labels: Vec<u32>,
    /// Channels per image.
    pub channels: usize,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Floats per image.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The CHW floats of image `i`.
    pub fn image(&self, i: usize) -> &[f32] {
        let len = self.image_len();
        &self.images[i * len..(i + 1) * len]
    }

    /// A new dataset with the images at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let mut images = Vec::with_capacity(indices.len() * self.image_len());
        for &i in indices {
            images.extend_from_slice(self.image(i));
        }
        Dataset {
            images,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            channels: self.channels,
            height: self.height,
            width: self.width,
        }
    }
}

/// Splits `0..n` into (rest, held_out) by a seeded shuffle, holding out `fraction` of it
/// (at least one item when `fraction > 0` and `n > 1`). Both parts are returned sorted.
pub fn seeded_split(n: usize, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut StdRng::seed_from_u64(seed));
    let mut k = (n as f64 * fraction.clamp(0.0, 1.0)).round() as usize;
    if fraction > 0.0 && n > 1 {
        k = k.clamp(1, n - 1);
    }
    let mut held: Vec<usize> = idx[..k].to_vec();
    let mut rest: Vec<usize> = idx[k..].to_vec();
    held.sort_unstable();
    rest.sort_unstable();
    (rest, held)
}

/// Splits the indices of `labels` into (rest, held_out) class by class: each class holds
/// out `fraction` of its own images (seeded shuffle per class, at least one image of a
/// class with two or more when `fraction > 0`), so both parts keep the class balance of the
/// whole even for small or skewed datasets. Both parts are returned sorted.
pub fn stratified_split(labels: &[u32], fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let classes = labels.iter().copied().max().map_or(0, |m| m as usize + 1);
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for (i, &l) in labels.iter().enumerate() {
        by_class[l as usize].push(i);
    }
    let (mut rest, mut held) = (Vec::new(), Vec::new());
    for (class, members) in by_class.iter().enumerate() {
        let (r, h) = seeded_split(
            members.len(),
            fraction,
            seed ^ (class as u64).wrapping_mul(0x9e37_79b9),
        );
        rest.extend(r.into_iter().map(|k| members[k]));
        held.extend(h.into_iter().map(|k| members[k]));
    }
    rest.sort_unstable();
    held.sort_unstable();
    (rest, held)
}

/// A folder of class folders, loaded and preprocessed.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    /// Class folder names, sorted; the label of a class is its index here.
    pub class_dirs: Vec<String>,
    /// All readable images, in (class, file name) order.
    pub data: Dataset,
    /// Paths of the images in `data`, same order (for reporting).
    pub paths: Vec<PathBuf>,
    /// Files that could not be decoded as images and were skipped.
    pub skipped: Vec<PathBuf>,
}

/// The files of a folder of class folders, before any is read.
#[derive(Clone, Debug)]
pub struct FolderListing {
    /// Class folder names, sorted; the label of a class is its index here.
    pub class_dirs: Vec<String>,
    /// Every regular file of every class folder, in (class, file name) order.
    pub files: Vec<PathBuf>,
    /// The label of each file, same order.
    pub labels: Vec<u32>,
}

/// Lists `dir/<class>/<file>`: each subfolder not starting with `.` is a class (sorted by
/// name), each regular file in it a candidate image.
pub fn list_image_folder(dir: &Path) -> anyhow::Result<FolderListing> {
    let mut class_dirs: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            match entry.file_name().into_string() {
                Ok(name) if !name.starts_with('.') => class_dirs.push(name),
                Ok(_) => {}
                Err(name) => tracing::warn!(?name, "skipping folder with a non UTF-8 name"),
            }
        }
    }
    class_dirs.sort();
    if class_dirs.is_empty() {
        bail!("{} has no class subfolders", dir.display());
    }
    let (mut files, mut labels) = (Vec::new(), Vec::new());
    for (label, class) in class_dirs.iter().enumerate() {
        let class_path = dir.join(class);
        let mut in_class: Vec<PathBuf> = std::fs::read_dir(&class_path)
            .with_context(|| format!("reading {}", class_path.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        in_class.sort();
        labels.extend(std::iter::repeat_n(label as u32, in_class.len()));
        files.extend(in_class);
    }
    Ok(FolderListing {
        class_dirs,
        files,
        labels,
    })
}

/// Decodes an image file, whatever its extension says (the format is sniffed).
pub fn decode_image(path: &Path) -> anyhow::Result<image::DynamicImage> {
    let img = image::ImageReader::open(path)?
        .with_guessed_format()?
        .decode()?;
    if img.width() == 0 || img.height() == 0 {
        bail!("an image of {}x{} pixels", img.width(), img.height());
    }
    Ok(img)
}

/// Loads `dir/<class>/<file>`: each subfolder is a class (sorted by name), every file the
/// `image` crate can decode is converted with `pre`; other files are skipped with a warning.
pub fn load_image_folder(dir: &Path, pre: &Preprocessor) -> anyhow::Result<ImageFolder> {
    let listing = list_image_folder(dir)?;
    let (channels, height, width) = pre.dims();
    let mut data = Dataset {
        channels,
        height,
        width,
        ..Default::default()
    };
    let mut paths = Vec::new();
    let mut skipped = Vec::new();
    for (file, &label) in listing.files.into_iter().zip(&listing.labels) {
        match decode_image(&file) {
            Ok(img) => {
                pre.append_input(&img, &mut data.images);
                data.labels.push(label);
                paths.push(file);
            }
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "skipping unreadable file");
                skipped.push(file);
            }
        }
    }
    Ok(ImageFolder {
        class_dirs: listing.class_dirs,
        data,
        paths,
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn parses_raw_and_gz_idx() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let pixels: Vec<u8> = (0..2 * 3 * 4).map(|i| i as u8).collect();
        let bytes = idx_bytes(&[2, 3, 4], &pixels);
        let raw = dir.path().join("raw-idx3-ubyte");
        std::fs::write(&raw, &bytes)?;
        let gz = dir.path().join("x-idx3-ubyte.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&bytes)?;
        std::fs::write(&gz, enc.finish()?)?;
        for p in [raw, gz] {
            let idx = read_idx(&p)?;
            assert_eq!(idx.dims, vec![2, 3, 4]);
            assert_eq!(idx.data, pixels);
        }
        Ok(())
    }

    #[test]
    fn rejects_bad_idx() {
        assert!(matches!(
            parse_idx(&[1, 2, 3, 4]),
            Err(IdxError::BadMagic(_))
        ));
        assert!(matches!(
            parse_idx(&idx_bytes(&[5], &[1, 2])),
            Err(IdxError::Truncated { .. })
        ));
        assert!(matches!(
            parse_idx(&[0, 0, 0x0d, 1, 0, 0, 0, 0]),
            Err(IdxError::UnsupportedType(0x0d))
        ));
    }

    #[test]
    fn loads_fashion_mnist_layout_mixed_gz_and_raw() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let write = |name: &str, bytes: Vec<u8>, gz: bool| -> anyhow::Result<()> {
            if gz {
                let mut enc =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                enc.write_all(&bytes)?;
                std::fs::write(dir.path().join(format!("{name}.gz")), enc.finish()?)?;
            } else {
                std::fs::write(dir.path().join(name), bytes)?;
            }
            Ok(())
        };
        write(
            "train-images-idx3-ubyte",
            idx_bytes(&[3, 2, 2], &[7; 12]),
            true,
        )?;
        write(
            "train-labels-idx1-ubyte",
            idx_bytes(&[3], &[0, 1, 2]),
            false,
        )?;
        write(
            "t10k-images-idx3-ubyte",
            idx_bytes(&[1, 2, 2], &[255; 4]),
            false,
        )?;
        write("t10k-labels-idx1-ubyte", idx_bytes(&[1], &[9]), true)?;
        let ds = load_fashion_mnist(dir.path())?;
        assert_eq!((ds.train.n, ds.train.rows, ds.train.cols), (3, 2, 2));
        assert_eq!(ds.train.labels, vec![0, 1, 2]);
        assert_eq!(ds.test.labels, vec![9]);
        assert_eq!(ds.test.image(0), &[255; 4]);
        let f = ds.test.to_dataset(&Normalization {
            mean: vec![0.5],
            std: vec![0.5],
        });
        assert_eq!(f.images, vec![1.0; 4]);
        Ok(())
    }

    #[test]
    fn stratified_split_keeps_every_class_in_proportion() {
        // 3 classes of 10, 30 and 60 images, interleaved.
        let labels: Vec<u32> = (0..100u32)
            .map(|i| match i % 10 {
                0 => 0,
                1..=3 => 1,
                _ => 2,
            })
            .collect();
        let (rest, held) = stratified_split(&labels, 0.2, 3);
        let count = |idx: &[usize], c: u32| idx.iter().filter(|&&i| labels[i] == c).count();
        assert_eq!(
            [count(&held, 0), count(&held, 1), count(&held, 2)],
            [2, 6, 12]
        );
        assert_eq!(rest.len() + held.len(), 100);
        let mut all: Vec<usize> = rest.iter().chain(&held).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(stratified_split(&labels, 0.2, 3), (rest, held.clone()));
        assert_ne!(stratified_split(&labels, 0.2, 4).1, held);
        // A lone image is too few to hold out at 20%; a class of two gives one.
        let (_, held) = stratified_split(&[0, 1, 1], 0.2, 1);
        assert!(held.len() == 1 && held[0] != 0, "{held:?}");
        assert!(stratified_split(&labels, 0.0, 1).1.is_empty());
    }

    #[test]
    fn seeded_split_is_deterministic_and_disjoint() {
        let (a, b) = seeded_split(100, 0.2, 7);
        assert_eq!((a.len(), b.len()), (80, 20));
        assert_eq!(seeded_split(100, 0.2, 7), (a.clone(), b.clone()));
        let mut all: Vec<usize> = a.iter().chain(&b).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_ne!(seeded_split(100, 0.2, 8).1, b);
    }
}
