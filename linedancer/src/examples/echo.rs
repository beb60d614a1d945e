//! The smallest protocol: every byte back, unchanged and in order.

use bytes::BytesMut;

use crate::codec::Raw;
use crate::protocol::{Ctx, Next, Protocol};

/// Writes back every byte it receives, unchanged and in order (binary safe).
///
/// Its frames are [`Raw`]: whatever one read brought in. It has a single state, `RECV`,
/// like the original's `'RECV'` state.
#[derive(Debug)]
pub struct Echo;

impl Protocol for Echo {
    type Codec = Raw;
    type Reply = BytesMut;
    type Message = ();

    fn connect(_ctx: &mut Ctx<'_, Self>) -> Self {
        Echo
    }

    fn frame(&mut self, bytes: BytesMut, ctx: &mut Ctx<'_, Self>) -> Next {
        ctx.send(bytes);
        Next::Continue
    }

    fn state_name(&self) -> &'static str {
        "RECV"
    }
}
