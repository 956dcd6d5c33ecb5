use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// Builds the XDP program (`lb-ebpf`) for bpfel-unknown-none with the nightly toolchain and
/// bpf-linker; the object lands in OUT_DIR and `datapath.rs` embeds it.
fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "lb-ebpf")
        .ok_or_else(|| anyhow!("lb-ebpf package not found"))?;
    let root = ebpf.manifest_path.parent().ok_or_else(|| anyhow!("lb-ebpf has no directory"))?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "lb-ebpf", root_dir: root.as_str(), ..Default::default() }],
        Toolchain::default(),
    )
}
