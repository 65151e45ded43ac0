//! agentseg: kernel-enforced micro-segmentation for autonomous agents.
pub mod compile;
pub mod policy;
