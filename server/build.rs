//! Rebuilds the server when a migration is added or changed: the migrations
//! are embedded by `sqlx::migrate!`, which cargo does not track on its own.

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
