//! What the `obuilder` binary shares with other front ends (the cluster worker).

pub mod sandbox_args;
