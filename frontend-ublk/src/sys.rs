//! The ublk UAPI (include/uapi/linux/ublk_cmd.h) that braid uses, written
//! out by hand so the default build needs no bindgen or libclang. Layouts
//! are checked against the header's sizes in the tests below.

#![allow(dead_code)]

/// Control commands, on /dev/ublk-control (ioctl-encoded, as kernels
/// since 6.3 prefer and as 6.12 requires when legacy opcodes are off).
pub const CMD_GET_DEV_INFO: u32 = ctrl(0x02);
pub const CMD_ADD_DEV: u32 = ctrl(0x04);
pub const CMD_DEL_DEV: u32 = ctrl(0x05);
pub const CMD_START_DEV: u32 = ctrl(0x06);
pub const CMD_STOP_DEV: u32 = ctrl(0x07);
pub const CMD_SET_PARAMS: u32 = ctrl(0x08);
pub const CMD_GET_PARAMS: u32 = ctrl(0x09);
pub const CMD_START_USER_RECOVERY: u32 = ctrl(0x10);
pub const CMD_END_USER_RECOVERY: u32 = ctrl(0x11);

/// IO commands, on /dev/ublkcN.
pub const IO_FETCH_REQ: u32 = io(0x20);
pub const IO_COMMIT_AND_FETCH_REQ: u32 = io(0x21);

/// What a fetch completes with: a request to serve, or the queue is going
/// away (the device stopped, or this daemon is being replaced).
pub const IO_RES_OK: i32 = 0;
pub const IO_RES_ABORT: i32 = -libc::ENODEV;

/// Where each queue's request descriptors are mapped on /dev/ublkcN.
pub const CMD_BUF_OFFSET: i64 = 0;
pub const MAX_QUEUE_DEPTH: usize = 4096;

/// Device flags.
pub const F_USER_RECOVERY: u64 = 1 << 3;
pub const F_USER_RECOVERY_REISSUE: u64 = 1 << 4;

/// Device states.
pub const S_DEV_DEAD: u16 = 0;
pub const S_DEV_LIVE: u16 = 1;
pub const S_DEV_QUIESCED: u16 = 2;

/// Request operations and flags, in `IoDesc::op_flags`.
pub const IO_OP_READ: u8 = 0;
pub const IO_OP_WRITE: u8 = 1;
pub const IO_OP_FLUSH: u8 = 2;
pub const IO_OP_DISCARD: u8 = 3;
pub const IO_OP_WRITE_SAME: u8 = 4;
pub const IO_OP_WRITE_ZEROES: u8 = 5;
pub const IO_F_FUA: u32 = 1 << 13;
pub const IO_F_NOUNMAP: u32 = 1 << 15;

/// Device attributes, in `ParamBasic::attrs`.
pub const ATTR_READ_ONLY: u32 = 1 << 0;
pub const ATTR_VOLATILE_CACHE: u32 = 1 << 2;
pub const ATTR_FUA: u32 = 1 << 3;

pub const PARAM_TYPE_BASIC: u32 = 1 << 0;
pub const PARAM_TYPE_DISCARD: u32 = 1 << 1;

const fn ioc_readwrite(nr: u32, size: usize) -> u32 {
    (3 << 30) | ((size as u32) << 16) | ((b'u' as u32) << 8) | nr
}

const fn ctrl(nr: u32) -> u32 {
    ioc_readwrite(nr, std::mem::size_of::<CtrlCmd>())
}

const fn io(nr: u32) -> u32 {
    ioc_readwrite(nr, std::mem::size_of::<IoCmd>())
}

/// `struct ublksrv_ctrl_cmd`: the first 32 bytes of a control SQE's command.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct CtrlCmd {
    pub dev_id: u32,
    pub queue_id: u16,
    pub len: u16,
    pub addr: u64,
    pub data: [u64; 2],
}

/// `struct ublksrv_ctrl_dev_info`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct DevInfo {
    pub nr_hw_queues: u16,
    pub queue_depth: u16,
    pub state: u16,
    pub pad0: u16,
    pub max_io_buf_bytes: u32,
    pub dev_id: u32,
    pub ublksrv_pid: i32,
    pub pad1: u32,
    pub flags: u64,
    pub ublksrv_flags: u64,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub reserved1: u64,
    pub reserved2: u64,
}

/// `struct ublksrv_io_desc`: one request, in the mapped descriptor array.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IoDesc {
    pub op_flags: u32,
    pub nr_sectors: u32,
    pub start_sector: u64,
    pub addr: u64,
}

/// `struct ublksrv_io_cmd`: a fetch or commit, in an IO SQE's command.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IoCmd {
    pub q_id: u16,
    pub tag: u16,
    pub result: i32,
    pub addr: u64,
}

/// `struct ublk_param_basic`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ParamBasic {
    pub attrs: u32,
    pub logical_bs_shift: u8,
    pub physical_bs_shift: u8,
    pub io_opt_shift: u8,
    pub io_min_shift: u8,
    pub max_sectors: u32,
    pub chunk_sectors: u32,
    pub dev_sectors: u64,
    pub virt_boundary_mask: u64,
}

/// `struct ublk_param_discard`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ParamDiscard {
    pub discard_alignment: u32,
    pub discard_granularity: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_discard_segments: u16,
    pub reserved0: u16,
}

/// `struct ublk_params`, as far as braid sets it (`len` tells the kernel
/// where this version of the structure ends).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Params {
    pub len: u32,
    pub types: u32,
    pub basic: ParamBasic,
    pub discard: ParamDiscard,
}

/// Bytes of `value` as they go to the kernel.
pub fn bytes_of<T: Copy>(value: &T) -> &[u8] {
    // SAFETY: T is one of the plain repr(C) structures above (no padding
    // the kernel would misread, no pointers), borrowed for the slice's life.
    unsafe {
        std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    #[test]
    fn layouts_match_the_kernel_header() {
        assert_eq!(size_of::<CtrlCmd>(), 32);
        assert_eq!(size_of::<DevInfo>(), 64);
        assert_eq!(size_of::<IoDesc>(), 24);
        assert_eq!(size_of::<IoCmd>(), 16);
        assert_eq!(size_of::<ParamBasic>(), 32);
        assert_eq!(size_of::<ParamDiscard>(), 20);
        assert_eq!(size_of::<Params>(), 64);
    }

    #[test]
    fn commands_are_ioctl_encoded_as_the_header_defines_them() {
        // UBLK_U_CMD_ADD_DEV = _IOWR('u', 0x04, struct ublksrv_ctrl_cmd)
        assert_eq!(CMD_ADD_DEV, 0xc020_7504);
        // UBLK_U_IO_FETCH_REQ = _IOWR('u', 0x20, struct ublksrv_io_cmd)
        assert_eq!(IO_FETCH_REQ, 0xc010_7520);
        assert_eq!(IO_COMMIT_AND_FETCH_REQ, 0xc010_7521);
    }
}
