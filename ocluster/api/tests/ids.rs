//! The interface and struct ids are what makes the schema wire-compatible with OCaml's
//! OCluster: a call names its interface by id. These are the ids the original programs
//! put on the wire (captured in ../shared/reference/ocluster-golden/README.md) and the
//! ones Cap'n Proto derives from the original schema's names.

use capnp::traits::HasTypeId;
use ocluster_api::*;

fn id<T: HasTypeId>() -> u64 {
    T::TYPE_ID
}

#[test]
fn interface_ids_are_the_originals() {
    assert_eq!(id::<submission::Client>(), 0xf4e8_a768_b32a_7c42);
    assert_eq!(id::<persistent::Client>(), 0xc8cb_212f_cd9f_5691);
    assert_eq!(id::<ticket::Client>(), 0x9497_c03b_7ca5_b27b);
    assert_eq!(id::<job::Client>(), 0xca66_fd1f_972e_fccc);
    assert_eq!(id::<admin::Client>(), 0xdd51_f355_40da_c6ad);
    assert_eq!(id::<registration::Client>(), 0xe098_a12b_91e3_5740);
    assert_eq!(id::<queue::Client>(), 0x817f_986f_8026_3aaf);
    assert_eq!(id::<worker::Client>(), 0xe06e_edcf_95bf_7905);
    assert_eq!(id::<progress::Client>(), 0xd752_9e27_02cd_958a);
    assert_eq!(id::<pool_admin::Client>(), 0xd906_b771_b408_2451);
}

#[test]
fn ids_module_matches_the_generated_code() {
    assert_eq!(ids::SUBMISSION, id::<submission::Client>());
    assert_eq!(ids::PERSISTENT, id::<persistent::Client>());
    assert_eq!(ids::TICKET, id::<ticket::Client>());
    assert_eq!(ids::JOB, id::<job::Client>());
    assert_eq!(ids::QUEUE, id::<queue::Client>());
    assert_eq!(ids::WORKER, id::<worker::Client>());
    assert_eq!(ids::REGISTRATION, id::<registration::Client>());
    assert_eq!(ids::PROGRESS, id::<progress::Client>());
    assert_eq!(ids::POOL_ADMIN, id::<pool_admin::Client>());
    assert_eq!(ids::ADMIN, id::<admin::Client>());
}

#[test]
fn struct_ids_are_derived_from_the_original_names() {
    assert_eq!(id::<docker_build::Reader<'static>>(), 0xb7cd_f362_59df_55e5);
    assert_eq!(id::<o_builder::Reader<'static>>(), 0x8b28_2bf6_5fde_e6f3);
    assert_eq!(id::<custom::Reader<'static>>(), 0xa5a1_f28b_5d27_1349);
    assert_eq!(id::<secret::Reader<'static>>(), 0xd3d0_bc06_b7e0_ea84);
    assert_eq!(id::<job_descr::Reader<'static>>(), 0xe8a1_1e4c_d691_4f3e);
    assert_eq!(id::<metric::Reader<'static>>(), 0xa6d3_4960_e6d0_feab);
    assert_eq!(
        id::<additional_metric::Reader<'static>>(),
        0xcf99_16b2_e02f_841b
    );
    assert_eq!(id::<worker_info::Reader<'static>>(), 0x89d2_51d5_8984_b1eb);
}

/// A JobDescr built here reads back with the original's field layout: the union's
/// discriminant and every ordinal land where the schema puts them.
#[test]
fn job_descr_round_trips() {
    let mut msg = capnp::message::Builder::new_default();
    {
        let mut d = msg.init_root::<job_descr::Builder>();
        d.reborrow()
            .init_action()
            .init_obuilder()
            .set_spec("((from busybox))");
        d.set_cache_hint("hint");
        d.set_repository("https://example.org/r.git");
        let mut c = d.reborrow().init_commits(1);
        c.set(0, "0123456789abcdef0123456789abcdef01234567");
        let mut s = d.init_secrets(1);
        s.reborrow().get(0).set_id("token");
        s.get(0).set_value("v");
    }
    let bytes = capnp::serialize::write_message_to_words(&msg);
    let reader =
        capnp::serialize::read_message(&mut &bytes[..], capnp::message::ReaderOptions::new())
            .unwrap();
    let d = reader.get_root::<job_descr::Reader>().unwrap();
    match d.get_action().which().unwrap() {
        job_descr::action::Obuilder(o) => {
            assert_eq!(o.unwrap().get_spec().unwrap(), "((from busybox))")
        }
        _ => panic!("wrong action"),
    }
    assert_eq!(d.get_cache_hint().unwrap(), "hint");
    assert_eq!(d.get_secrets().unwrap().get(0).get_id().unwrap(), "token");
}
