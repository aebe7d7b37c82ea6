//! Real services that Debian packages, tested on real VMs the way nixpkgs's
//! `nixos/tests` drive them: the tests are `examples/services/*`, each a
//! vmrig test directory, and each must pass as written. Client nodes share
//! one package set, so the suite builds one client image for all of them.

mod common;

use std::path::{Path, PathBuf};

use common::run;

fn service(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/services").join(name)
}

/// Runs `examples/services/<name>` and expects it to pass, every subtest
/// of it included.
fn passes(name: &str) {
    let dir = service(name);
    let (code, output) = run(&dir);
    assert_eq!(code, Some(0), "{name}:\n{output}");
    let junit = std::fs::read_to_string(dir.join("result/junit.xml")).unwrap();
    assert!(junit.contains(r#"failures="0""#), "{junit}");
}

#[test]
fn nginx_serves_the_nodes_site_and_reloads_its_configuration() {
    passes("nginx");
}

#[test]
fn openssh_lets_a_known_key_in_and_keeps_an_unknown_one_out() {
    passes("openssh");
}

#[test]
fn redis_answers_a_client_on_another_node_and_keeps_data_across_a_restart() {
    passes("redis");
}

#[test]
fn nfs_exports_a_directory_of_the_servers_root_to_a_client() {
    passes("nfs");
}

#[test]
fn wireguard_peers_talk_through_their_tunnel_and_a_wrong_key_does_not() {
    passes("wireguard");
}

#[test]
fn haproxy_balances_two_backends_and_drops_a_stopped_one() {
    passes("haproxy");
}

#[test]
fn an_apache_balancer_fails_over_while_a_backend_is_unplugged_and_back() {
    passes("apache-proxy");
}

#[test]
fn memcached_stores_counts_and_expires_values() {
    passes("memcached");
}

#[test]
fn bind_serves_its_zone_to_another_node_and_reloads_it() {
    passes("bind");
}

#[test]
fn ferm_loads_the_nodes_own_rules_in_early_boot_and_reloads_them() {
    passes("ferm");
}

#[test]
fn keepalived_moves_its_address_to_the_backup_on_a_crash_and_back() {
    passes("keepalived");
}

#[test]
fn avahi_resolves_names_and_finds_a_service_published_in_the_background() {
    passes("avahi");
}

#[test]
fn vsftpd_serves_anonymous_downloads_and_a_users_uploads_through_passive_ports() {
    passes("vsftpd");
}

#[test]
fn dovecot_lets_a_user_in_with_her_password_and_keeps_her_mail() {
    passes("dovecot");
}

#[test]
fn etcd_members_form_a_cluster_that_etcdctl_finds_through_profile_d() {
    passes("etcd");
}
