//! /dev/ublk-control: adding, configuring, starting, stopping and deleting
//! devices. Each command is one 128-byte SQE on a small ring of its own,
//! waited for synchronously (START_DEV blocks until every queue has
//! fetched, so callers run these off the IO threads).

use crate::sys::{self, CtrlCmd, DevInfo, Params};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;

const CONTROL_PATH: &str = "/dev/ublk-control";

pub(crate) struct Control {
    file: File,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
}

impl Control {
    pub(crate) fn open() -> io::Result<Control> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(CONTROL_PATH)
            .map_err(|e| {
                let fix = match e.kind() {
                    io::ErrorKind::PermissionDenied => {
                        "creating block devices needs root (or CAP_SYS_ADMIN)"
                    }
                    io::ErrorKind::NotFound => {
                        "is the ublk_drv module loaded? `modprobe ublk_drv` (Linux 6.0 or later)"
                    }
                    _ => "ublk needs Linux 6.0 or later with ublk_drv loaded",
                };
                io::Error::new(e.kind(), format!("{CONTROL_PATH}: {e} ({fix})"))
            })?;
        let ring = IoUring::builder().build(4)?;
        Ok(Control { file, ring })
    }

    fn command(&mut self, op: u32, cmd: CtrlCmd) -> io::Result<i32> {
        let mut raw = [0u8; 80];
        raw[..std::mem::size_of::<CtrlCmd>()].copy_from_slice(sys::bytes_of(&cmd));
        let sqe = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), op)
            .cmd(raw)
            .build()
            .user_data(op as u64);
        // SAFETY: the buffers `cmd.addr` points at outlive the wait below,
        // which returns only after the kernel completed the command.
        unsafe {
            self.ring
                .submission()
                .push(&sqe)
                .map_err(|_| io::Error::other("ublk control ring full"))?;
        }
        self.ring.submit_and_wait(1)?;
        let cqe = self
            .ring
            .completion()
            .next()
            .ok_or_else(|| io::Error::other("ublk control: no completion"))?;
        match cqe.result() {
            r if r < 0 => Err(io::Error::from_raw_os_error(-r)),
            r => Ok(r),
        }
    }

    fn for_device(dev_id: u32) -> CtrlCmd {
        CtrlCmd {
            dev_id,
            queue_id: u16::MAX,
            ..CtrlCmd::default()
        }
    }

    /// Adds a device as `info` describes it (`dev_id` u32::MAX: any free
    /// number); `info` comes back as the kernel made it.
    pub(crate) fn add(&mut self, info: &mut DevInfo) -> io::Result<()> {
        let mut cmd = Self::for_device(info.dev_id);
        cmd.addr = info as *mut DevInfo as u64;
        cmd.len = std::mem::size_of::<DevInfo>() as u16;
        self.command(sys::CMD_ADD_DEV, cmd).map(drop)
    }

    pub(crate) fn info(&mut self, dev_id: u32) -> io::Result<DevInfo> {
        let mut info = DevInfo::default();
        let mut cmd = Self::for_device(dev_id);
        cmd.addr = &mut info as *mut DevInfo as u64;
        cmd.len = std::mem::size_of::<DevInfo>() as u16;
        self.command(sys::CMD_GET_DEV_INFO, cmd)?;
        Ok(info)
    }

    pub(crate) fn params(&mut self, dev_id: u32) -> io::Result<Params> {
        let mut params = Params {
            len: std::mem::size_of::<Params>() as u32,
            ..Params::default()
        };
        let mut cmd = Self::for_device(dev_id);
        cmd.addr = &mut params as *mut Params as u64;
        cmd.len = std::mem::size_of::<Params>() as u16;
        self.command(sys::CMD_GET_PARAMS, cmd)?;
        Ok(params)
    }

    pub(crate) fn set_params(&mut self, dev_id: u32, params: &Params) -> io::Result<()> {
        let mut cmd = Self::for_device(dev_id);
        cmd.addr = params as *const Params as u64;
        cmd.len = std::mem::size_of::<Params>() as u16;
        self.command(sys::CMD_SET_PARAMS, cmd).map(drop)
    }

    /// Blocks until every queue has fetched, then /dev/ublkbN appears.
    pub(crate) fn start(&mut self, dev_id: u32) -> io::Result<()> {
        let mut cmd = Self::for_device(dev_id);
        cmd.data[0] = std::process::id() as u64;
        self.command(sys::CMD_START_DEV, cmd).map(drop)
    }

    /// Removes /dev/ublkbN once IO in flight has completed; the queues'
    /// fetches then complete with ABORT.
    pub(crate) fn stop(&mut self, dev_id: u32) -> io::Result<()> {
        self.command(sys::CMD_STOP_DEV, Self::for_device(dev_id))
            .map(drop)
    }

    pub(crate) fn delete(&mut self, dev_id: u32) -> io::Result<()> {
        self.command(sys::CMD_DEL_DEV, Self::for_device(dev_id))
            .map(drop)
    }

    /// Takes over a device whose daemon died (it must have been added with
    /// user recovery): its queues are then fetched again by this process.
    pub(crate) fn start_recovery(&mut self, dev_id: u32) -> io::Result<()> {
        self.command(sys::CMD_START_USER_RECOVERY, Self::for_device(dev_id))
            .map(drop)
    }

    /// Blocks until every queue has fetched again, then IO resumes.
    pub(crate) fn end_recovery(&mut self, dev_id: u32) -> io::Result<()> {
        let mut cmd = Self::for_device(dev_id);
        cmd.data[0] = std::process::id() as u64;
        self.command(sys::CMD_END_USER_RECOVERY, cmd).map(drop)
    }
}
