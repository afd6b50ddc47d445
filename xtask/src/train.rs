pub fn train(_args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("`cargo xtask train` is not available yet: the trainer issue has not landed")
}
pub fn pretrain_demo(_args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("not available yet: the trainer issue has not landed")
}
pub fn bench(_args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("not available yet; use `cargo bench -p afinar-kernels`")
}
