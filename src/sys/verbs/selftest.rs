//! The bindings on real devices: an RC queue pair between two devices, one RDMA WRITE, one
//! RDMA READ and one completion event, through [`Verbs`] and the reimplemented inline calls
//! ([`post_send`], [`poll_cq`], [`req_notify_cq`]). Runs where `RDMA_VM=1` (inside the
//! soft-RoCE VM of `../shared/rdma-vm`, devices from `RDMA_VM_DEVS`); skipped elsewhere.

use std::ffi::{c_int, c_void};
use std::net::Ipv6Addr;
use std::ptr;
use std::time::{Duration, Instant};

use super::bindings::*;
use super::{gid_raw, poll_cq, post_send, req_notify_cq, Context, DeviceList, Verbs};

const BUF: usize = 64 * 1024;

/// One end: a device's context with a PD, a CQ on a completion channel, an RC QP and a
/// registered buffer. Destroyed in reverse order on drop.
struct End {
    ctx: Context,
    pd: *mut ibv_pd,
    channel: *mut ibv_comp_channel,
    cq: *mut ibv_cq,
    qp: *mut ibv_qp,
    mr: *mut ibv_mr,
    buf: Vec<u8>,
    gid: ibv_gid,
    gid_index: u8,
    mtu: ibv_mtu,
}

fn verbs() -> &'static Verbs {
    Verbs::load().expect("libibverbs loads in the RDMA VM")
}

fn check(rc: c_int, what: &str) {
    assert_eq!(
        rc,
        0,
        "{what} failed: {rc} ({})",
        std::io::Error::last_os_error()
    );
}

impl End {
    fn new(ctx: Context) -> End {
        let v = verbs();
        let port = ctx.query_port(1).expect("query_port");
        assert_eq!(
            port.state,
            ibv_port_state::IBV_PORT_ACTIVE,
            "port 1 of {} not active",
            ctx.name()
        );
        // The RoCE v2 GID holding an IPv4-mapped address, as the transport will choose.
        let (gid_index, gid) = (0..port.gid_tbl_len as u32)
            .filter_map(|i| ctx.query_gid(1, i).ok().map(|g| (i, g)))
            .find(|(_, g)| Ipv6Addr::from(gid_raw(g)).to_ipv4_mapped().is_some())
            .expect("an IPv4-mapped GID");
        let mut buf = vec![0u8; BUF];
        // SAFETY: the context is open; every object is created on it (or on its PD) and
        // destroyed in reverse order in Drop; buf outlives the MR (dropped after it, and
        // its heap block never moves: the Vec is not resized).
        unsafe {
            let pd = v.alloc_pd(ctx.as_ptr());
            assert!(!pd.is_null(), "ibv_alloc_pd");
            let channel = v.create_comp_channel(ctx.as_ptr());
            assert!(!channel.is_null(), "ibv_create_comp_channel");
            let cq = v.create_cq(ctx.as_ptr(), 64, ptr::null_mut(), channel, 0);
            assert!(!cq.is_null(), "ibv_create_cq");
            let mut init = ibv_qp_init_attr {
                send_cq: cq,
                recv_cq: cq,
                cap: ibv_qp_cap {
                    max_send_wr: 32,
                    max_recv_wr: 1,
                    max_send_sge: 1,
                    max_recv_sge: 1,
                    max_inline_data: 64,
                },
                qp_type: ibv_qp_type::IBV_QPT_RC,
                sq_sig_all: 0,
                ..Default::default()
            };
            let qp = v.create_qp(pd, &mut init);
            assert!(
                !qp.is_null(),
                "ibv_create_qp: {}",
                std::io::Error::last_os_error()
            );
            let access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
                | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
                | ibv_access_flags::IBV_ACCESS_REMOTE_READ;
            let mr = v.reg_mr(pd, buf.as_mut_ptr().cast::<c_void>(), BUF, access.0);
            assert!(
                !mr.is_null(),
                "ibv_reg_mr: {}",
                std::io::Error::last_os_error()
            );
            End {
                ctx,
                pd,
                channel,
                cq,
                qp,
                mr,
                buf,
                gid,
                gid_index: gid_index as u8,
                mtu: port.active_mtu,
            }
        }
    }

    fn qp_num(&self) -> u32 {
        // SAFETY: the QP is live until Drop.
        unsafe { (*self.qp).qp_num }
    }

    /// RESET -> INIT -> RTR -> RTS, connected to `peer`.
    fn connect(&self, peer: &End) {
        let v = verbs();
        let psn = 0x1234;
        let mut attr = ibv_qp_attr {
            qp_state: ibv_qp_state::IBV_QPS_INIT,
            pkey_index: 0,
            port_num: 1,
            qp_access_flags: (ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
                | ibv_access_flags::IBV_ACCESS_REMOTE_READ)
                .0,
            ..Default::default()
        };
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
            | ibv_qp_attr_mask::IBV_QP_PORT
            | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
        // SAFETY: the QP is live; attr is a valid ibv_qp_attr.
        check(
            unsafe { v.modify_qp(self.qp, &mut attr, mask.0 as c_int) },
            "modify_qp INIT",
        );

        let mut attr = ibv_qp_attr {
            qp_state: ibv_qp_state::IBV_QPS_RTR,
            path_mtu: if self.mtu.0 < peer.mtu.0 {
                self.mtu
            } else {
                peer.mtu
            },
            dest_qp_num: peer.qp_num(),
            rq_psn: psn,
            max_dest_rd_atomic: 1,
            min_rnr_timer: 12,
            ah_attr: ibv_ah_attr {
                is_global: 1,
                port_num: 1,
                grh: ibv_global_route {
                    dgid: peer.gid,
                    sgid_index: self.gid_index,
                    hop_limit: 64,
                    ..Default::default()
                },
                ..Default::default()
            },
            ..Default::default()
        };
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_AV
            | ibv_qp_attr_mask::IBV_QP_PATH_MTU
            | ibv_qp_attr_mask::IBV_QP_DEST_QPN
            | ibv_qp_attr_mask::IBV_QP_RQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
            | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
        // SAFETY: as above.
        check(
            unsafe { v.modify_qp(self.qp, &mut attr, mask.0 as c_int) },
            "modify_qp RTR",
        );

        let mut attr = ibv_qp_attr {
            qp_state: ibv_qp_state::IBV_QPS_RTS,
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            sq_psn: psn,
            max_rd_atomic: 1,
            ..Default::default()
        };
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_TIMEOUT
            | ibv_qp_attr_mask::IBV_QP_RETRY_CNT
            | ibv_qp_attr_mask::IBV_QP_RNR_RETRY
            | ibv_qp_attr_mask::IBV_QP_SQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
        // SAFETY: as above.
        check(
            unsafe { v.modify_qp(self.qp, &mut attr, mask.0 as c_int) },
            "modify_qp RTS",
        );
    }

    /// Posts one signaled RDMA op of `len` bytes from our buffer at `local` to the peer's at
    /// `remote`, and waits for its completion by polling.
    fn rdma(
        &mut self,
        opcode: ibv_wr_opcode,
        local: usize,
        peer: &End,
        remote: usize,
        len: usize,
        wr_id: u64,
    ) {
        self.post(opcode, local, peer, remote, len, wr_id);
        let wc = self.wait_poll(Duration::from_secs(20));
        assert_eq!(
            wc.status,
            ibv_wc_status::IBV_WC_SUCCESS,
            "wc status {:?}",
            wc.status
        );
        assert_eq!(wc.wr_id, wr_id);
        let expect = if opcode == ibv_wr_opcode::IBV_WR_RDMA_READ {
            ibv_wc_opcode::IBV_WC_RDMA_READ
        } else {
            ibv_wc_opcode::IBV_WC_RDMA_WRITE
        };
        assert_eq!(wc.opcode, expect);
    }

    fn post(
        &mut self,
        opcode: ibv_wr_opcode,
        local: usize,
        peer: &End,
        remote: usize,
        len: usize,
        wr_id: u64,
    ) {
        assert!(local + len <= BUF && remote + len <= BUF);
        // SAFETY: both MRs are live until Drop; the addresses are inside them.
        let (lkey, rkey) = unsafe { ((*self.mr).lkey, (*peer.mr).rkey) };
        let mut sge = ibv_sge {
            addr: self.buf.as_ptr() as u64 + local as u64,
            length: len as u32,
            lkey,
        };
        let mut wr = ibv_send_wr {
            wr_id,
            sg_list: &mut sge,
            num_sge: 1,
            opcode,
            send_flags: ibv_send_flags::IBV_SEND_SIGNALED.0,
            ..Default::default()
        };
        wr.wr.rdma = ibv_send_wr__bindgen_ty_2__bindgen_ty_1 {
            remote_addr: peer.buf.as_ptr() as u64 + remote as u64,
            rkey,
        };
        let mut bad: *mut ibv_send_wr = ptr::null_mut();
        // SAFETY: the QP is live and connected; wr and sge are valid for the call (the
        // provider copies them into its queue); the buffers are registered and stay alive
        // and untouched by Rust until the completion is polled.
        let rc = unsafe { post_send(self.qp, &mut wr, &mut bad) };
        check(rc, "post_send");
        assert!(bad.is_null());
    }

    fn wait_poll(&mut self, timeout: Duration) -> ibv_wc {
        let deadline = Instant::now() + timeout;
        let mut wc = [ibv_wc::default(); 4];
        loop {
            // SAFETY: the CQ is live and polled from this thread only; wc has 4 entries.
            let n = unsafe { poll_cq(self.cq, 4, wc.as_mut_ptr()) };
            assert!(n >= 0, "poll_cq: {n}");
            if n > 0 {
                assert_eq!(n, 1, "one completion expected");
                return wc[0];
            }
            assert!(
                Instant::now() < deadline,
                "no completion within {timeout:?}"
            );
            std::thread::yield_now();
        }
    }

    /// Arms the CQ, then waits (poll(2) with a timeout, then ibv_get_cq_event) for the event
    /// the next completion raises.
    fn wait_event(&mut self, timeout: Duration) {
        let v = verbs();
        // SAFETY: the channel is live until Drop.
        let fd = unsafe { (*self.channel).fd };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: pfd is one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as c_int) };
        assert_eq!(n, 1, "no completion event within {timeout:?}");
        let mut cq: *mut ibv_cq = ptr::null_mut();
        let mut cq_context: *mut c_void = ptr::null_mut();
        // SAFETY: the channel is live and readable; the out-pointers are valid.
        check(
            unsafe { v.get_cq_event(self.channel, &mut cq, &mut cq_context) },
            "get_cq_event",
        );
        assert_eq!(cq, self.cq);
        // SAFETY: cq is our live CQ; exactly one event was got.
        unsafe { v.ack_cq_events(cq, 1) };
    }
}

impl Drop for End {
    fn drop(&mut self) {
        let v = verbs();
        // SAFETY: every object is live, nothing is in flight (each test waits for its
        // completions), and they are destroyed children first.
        unsafe {
            check(v.destroy_qp(self.qp), "destroy_qp");
            check(v.dereg_mr(self.mr), "dereg_mr");
            check(v.destroy_cq(self.cq), "destroy_cq");
            check(v.destroy_comp_channel(self.channel), "destroy_comp_channel");
            check(v.dealloc_pd(self.pd), "dealloc_pd");
        }
        // ctx closes itself after this (field drop).
    }
}

#[test]
fn rdma_write_read_and_event_between_two_devices() {
    if std::env::var("RDMA_VM").as_deref() != Ok("1") {
        println!("skipped: not in the RDMA VM (RDMA_VM=1 unset)");
        return;
    }
    let devs = std::env::var("RDMA_VM_DEVS").unwrap_or_else(|_| "rxe0 rxe1".into());
    let names: Vec<&str> = devs.split_whitespace().collect();
    let list = DeviceList::new(verbs()).expect("device list");
    println!("devices: {list:?}");
    let open = |name: &str| {
        list.find(name)
            .unwrap_or_else(|| panic!("no {name}"))
            .open()
            .expect("open")
    };
    let mut a = End::new(open(names[0]));
    let mut b = End::new(open(names[1]));
    drop(list); // contexts stay valid without the list
    a.connect(&b);
    b.connect(&a);

    // Queried state agrees with what we set.
    let mut attr = ibv_qp_attr::default();
    let mut init = ibv_qp_init_attr::default();
    // SAFETY: the QP is live; attr and init are valid for writes.
    let rc = unsafe {
        verbs().query_qp(
            a.qp,
            &mut attr,
            ibv_qp_attr_mask::IBV_QP_STATE.0 as c_int,
            &mut init,
        )
    };
    check(rc, "query_qp");
    assert_eq!(attr.qp_state, ibv_qp_state::IBV_QPS_RTS);
    assert_eq!(init.qp_type, ibv_qp_type::IBV_QPT_RC);

    // WRITE a -> b.
    for (i, byte) in a.buf.iter_mut().enumerate() {
        *byte = (i % 251) as u8;
    }
    a.rdma(ibv_wr_opcode::IBV_WR_RDMA_WRITE, 0, &b, 4096, 32 * 1024, 1);
    assert!(
        b.buf[4096..4096 + 32 * 1024] == a.buf[..32 * 1024],
        "WRITE data differs"
    );
    assert!(
        b.buf[..4096].iter().all(|&x| x == 0),
        "WRITE wrote before its target"
    );

    // READ b -> a.
    for (i, byte) in b.buf.iter_mut().enumerate() {
        *byte = (i % 13) as u8 ^ 0x5a;
    }
    a.rdma(
        ibv_wr_opcode::IBV_WR_RDMA_READ,
        40 * 1024,
        &b,
        0,
        16 * 1024,
        2,
    );
    assert!(
        a.buf[40 * 1024..56 * 1024] == b.buf[..16 * 1024],
        "READ data differs"
    );

    // A completion event through the channel after req_notify_cq.
    // SAFETY: the CQ is live and has a completion channel.
    check(unsafe { req_notify_cq(a.cq, 0) }, "req_notify_cq");
    a.post(ibv_wr_opcode::IBV_WR_RDMA_WRITE, 0, &b, 0, 4096, 3);
    a.wait_event(Duration::from_secs(20));
    let wc = a.wait_poll(Duration::from_secs(20));
    assert_eq!((wc.status, wc.wr_id), (ibv_wc_status::IBV_WC_SUCCESS, 3));
    println!(
        "RC {} <-> {}: 32 KiB WRITE, 16 KiB READ and a completion event OK",
        a.ctx.name(),
        b.ctx.name()
    );
}
