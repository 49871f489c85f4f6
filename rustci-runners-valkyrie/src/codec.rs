//! The protobuf codec of the Valkyrie service (both sides): prost, with per-call buffers
//! of 1 KiB instead of tonic's 8 KiB.
//!
//! tonic allocates an encode and a decode buffer for every call up front, and a session
//! is two long-lived calls (`Session` and `Output`): with the default that is 32 KiB per
//! connected agent before a byte moves, most of a session's memory at thousands of
//! agents. The messages of an idle session are small, and a larger one grows its buffer
//! to its exact length at once (the length prefix is read first), so the smaller start
//! costs a large message nothing.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::ProstCodec;

/// Each call's initial encode and decode buffer.
const BUFFER_BYTES: usize = 1024;
/// Ready messages batched into one write, at most (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD)
}

/// prost encoding with small initial buffers (see the module's documentation).
#[derive(Debug, Clone, Copy)]
pub struct SmallCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallCodec<T, U> {
    fn default() -> Self {
        SmallCodec(PhantomData)
    }
}

impl<T, U> Codec for SmallCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
