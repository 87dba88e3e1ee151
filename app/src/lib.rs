//! What the binaries (`classifier-server`, `client-app`, `trainer`) share.
