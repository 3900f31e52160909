//go:build !linux

package embedded

// RenameNoReplace links the new name and then unlinks the old one.
func (OSFS) RenameNoReplace(oldName, newName string) error {
	return linkUnlink(oldName, newName)
}
